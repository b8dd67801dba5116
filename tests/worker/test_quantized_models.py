"""The tiny random Llama served quantized through ModelRunner, token for token against
Hugging Face transformers running the dequantized model (CPU, fp32).

W8A8 (int8, fp8): the reference holds the per-channel quantized-then-dequantized weights
and quantizes each projection's input per token the same way (a forward pre-hook), so
both sides compute with the same numbers. Pre-quantized fp8 (compressed-tensors), AWQ and
GPTQ: checkpoints written in each format's own layout from the random model; the
reference holds their dequantized weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from devtools.fp8_checkpoints import (
    fine_grained_fp8_config,
    set_quantization_config,
    write_fp8_block_checkpoint,
)
from devtools.int4_checkpoints import QUANTIZED_PROJECTIONS, write_int4_checkpoint
from gpu_worker.config import WorkerConfig
from gpu_worker.kernels.w8a8 import dequantize_rows, quantize_rows
from gpu_worker.model_runner import ModelRunner
from tests.support.greedy_runs import hf_greedy, runner_greedy
from tests.support.tiny_architectures import build_tiny_model
from tests.support.tiny_llama import TINY_DIMS, VOCAB_SIZE

# Every architecture and format against its reference: the full suite's, not the quick round's.
pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 8
BLOCK_SIZE = 4


def _tiny_llama(model_dir: Path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(tie_word_embeddings=False, **TINY_DIMS)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(model_dir)
    model.generation_config.eos_token_id = None
    return model


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (5, 13, 2)]


def _runner(model_dir: Path, quantization: str | None) -> ModelRunner:
    config = WorkerConfig(
        model_path=model_dir, device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=32, quantization=quantization
    )
    return ModelRunner(config)


def _projections(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_PROJECTIONS
    ]


def _fake_quantized_w8a8(model: torch.nn.Module, kind: str, per_tensor: bool = False) -> None:
    def quantize_input(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        values, scale = quantize_rows(x.reshape(-1, x.shape[-1]), kind)
        return (dequantize_rows(values, scale).reshape(x.shape).to(x.dtype),)

    with torch.no_grad():
        for _, module in _projections(model):
            values, scale = _quantize_weight(module.weight, kind, per_tensor)
            module.weight.copy_(dequantize_rows(values, scale))
            module.register_forward_pre_hook(quantize_input)


def _quantize_weight(weight: torch.Tensor, kind: str, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, or with one scale for the whole tensor ([rows, 1] either way)."""
    if not per_tensor:
        return quantize_rows(weight, kind)
    values, scale = quantize_rows(weight.reshape(1, -1), kind)
    return values.reshape(weight.shape), scale.expand(weight.shape[0], 1)


def _write_fp8_checkpoint(model_dir: Path, per_tensor: bool) -> None:
    """The projections as llm-compressor writes fp8 W8A8 (compressed-tensors): `weight` in
    float8 e4m3, `weight_scale` [out, 1] per channel or [1] per tensor."""
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    for name in [n for n in tensors if n.rsplit(".", 2)[-2] in QUANTIZED_PROJECTIONS]:
        values, scale = _quantize_weight(tensors[name], "fp8", per_tensor)
        tensors[name] = values
        tensors[name + "_scale"] = scale[:1, 0].clone() if per_tensor else scale
    save_file(tensors, str(path), metadata={"format": "pt"})
    set_quantization_config(model_dir, _compressed_tensors_config(per_tensor))


def _compressed_tensors_config(per_tensor: bool) -> dict:
    scheme = {"num_bits": 8, "type": "float", "symmetric": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**scheme, "strategy": "tensor" if per_tensor else "channel", "dynamic": False},
                "input_activations": {**scheme, "strategy": "token", "dynamic": True},
            }
        },
        "ignore": ["lm_head"],
    }


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_w8a8_generates_the_dequantized_models_tokens(tmp_path: Path, kind: str) -> None:
    hf_model = _tiny_llama(tmp_path)
    runner = _runner(tmp_path, kind)
    layer = runner.model.model.layers[0]
    assert layer.mlp.down_proj.weight is None
    assert layer.self_attn.qkv_proj.weight_q.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn)
    unquantized = hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)
    _fake_quantized_w8a8(hf_model, kind)
    expected = hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)
    assert runner_greedy(runner, _prompts(), MAX_NEW_TOKENS) == expected
    # The quantization changes the numbers the model computes with; it is no no-op.
    assert expected != unquantized or kind == "int8"


@pytest.mark.hf
@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_checkpoint_generates_the_dequantized_models_tokens(tmp_path: Path, per_tensor: bool) -> None:
    hf_model = _tiny_llama(tmp_path)
    _write_fp8_checkpoint(tmp_path, per_tensor)
    runner = _runner(tmp_path, None)
    assert runner.model_config.quantization.prequantized
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight is None and qkv.weight_q.dtype == torch.float8_e4m3fn
    # Per tensor: q, k and v each bring a scale, spread over their own channels.
    assert len(set(qkv.weight_scale.tolist())) == (3 if per_tensor else qkv.output_size)
    _fake_quantized_w8a8(hf_model, "fp8", per_tensor)
    expected = hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)
    assert runner_greedy(runner, _prompts(), MAX_NEW_TOKENS) == expected
    assert runner_greedy(_runner(tmp_path, "fp8"), _prompts(), MAX_NEW_TOKENS) == expected


@pytest.mark.hf
def test_fp8_block_checkpoint_generates_the_dequantized_models_tokens(tmp_path: Path) -> None:
    hf_model = _tiny_llama(tmp_path)
    dequantized = write_fp8_block_checkpoint(tmp_path, block=16)
    runner = _runner(tmp_path, None)
    assert runner.model_config.quantization.weight_block == (16, 16)
    unquantized = hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)
    with torch.no_grad():
        for name, module in _projections(hf_model):
            module.weight.copy_(dequantized[name + ".weight"])
    expected = hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)
    assert runner_greedy(runner, _prompts(), MAX_NEW_TOKENS) == expected
    assert expected != unquantized  # the blocks' rounding reaches the tokens


@pytest.mark.hf
def test_fp8_block_checkpoint_of_experts_generates_the_dequantized_models_tokens(tmp_path: Path) -> None:
    # Qwen3-MoE's fine-grained fp8 release quantizes every expert's projections as the
    # attention's, in blocks; the router stays in the model's dtype.
    torch.manual_seed(0)
    model = build_tiny_model("qwen3_moe")
    reference_dir = tmp_path / "dequantized"
    for model_dir in (tmp_path / "fp8", reference_dir):
        model.save_pretrained(model_dir)
    dequantized = write_fp8_block_checkpoint(tmp_path / "fp8", block=16)
    assert any(".experts." in name for name in dequantized)
    tensors = load_file(str(reference_dir / "model.safetensors"))
    save_file({**tensors, **dequantized}, str(reference_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None
    runner = _runner(tmp_path / "fp8", None)
    assert runner.model_config.quantization.weight_block == (16, 16)
    assert runner_greedy(runner, _prompts(), MAX_NEW_TOKENS) == hf_greedy(
        hf_model, _prompts(), MAX_NEW_TOKENS
    )


def test_unsupported_fp8_checkpoints_are_refused_naming_the_field(tmp_path: Path) -> None:
    _tiny_llama(tmp_path)
    _write_fp8_checkpoint(tmp_path, per_tensor=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="input activations must be 8-bit float, dynamic, per token"):
        _runner(tmp_path, None)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight_block_size must be"):
        _runner(tmp_path, None)


@pytest.mark.hf
@pytest.mark.parametrize(
    ("method", "group_size", "act_order"), [("awq", 32, False), ("gptq", 32, False), ("gptq", 16, True)]
)
def test_int4_checkpoint_generates_the_dequantized_models_tokens(
    tmp_path: Path, method: str, group_size: int, act_order: bool
) -> None:
    hf_model = _tiny_llama(tmp_path)
    dequantized = write_int4_checkpoint(tmp_path, method, group_size, act_order)
    # From the checkpoint's quantization_config alone, and with the matching flag.
    runner = _runner(tmp_path, None)
    assert runner.model_config.quantization.method == method
    # Groups in input order take the split-K kernel on CUDA; act_order's do not.
    group_sizes = {m.int4_group_size for m in runner.model.modules() if hasattr(m, "int4_group_size")}
    assert group_sizes == {0 if act_order else group_size}
    with torch.no_grad():
        for name, module in _projections(hf_model):
            module.weight.copy_(dequantized[name + ".weight"])
    expected = hf_greedy(hf_model, _prompts(), MAX_NEW_TOKENS)
    assert runner_greedy(runner, _prompts(), MAX_NEW_TOKENS) == expected
    assert runner_greedy(_runner(tmp_path, method), _prompts(), MAX_NEW_TOKENS) == expected


def test_quantization_flag_conflicting_with_the_checkpoint_is_refused(tmp_path: Path) -> None:
    _tiny_llama(tmp_path)
    write_int4_checkpoint(tmp_path, "awq", 32)
    with pytest.raises(ValueError, match="--quantization gptq conflicts with the checkpoint's"):
        _runner(tmp_path, "gptq")


@pytest.mark.parametrize("method", ["int8", "awq"])
def test_dummy_weights_serve_quantized(tmp_path: Path, method: str) -> None:
    """--load-format dummy with --quantization: random weights of the config's shapes,
    quantized (int8) or made directly as packed 4-bit tensors (awq, group size 128)."""
    dims = {**TINY_DIMS, "hidden_size": 128, "intermediate_size": 256}
    transformers.LlamaConfig(**dims).save_pretrained(tmp_path)
    config = WorkerConfig(
        model_path=tmp_path, device="cpu", num_kv_blocks=8, load_format="dummy", quantization=method
    )
    runner = ModelRunner(config)
    mlp = runner.model.model.layers[0].mlp
    assert (mlp.down_proj.weight_q if method == "int8" else mlp.down_proj.qweight).dtype in (
        torch.int8,
        torch.int32,
    )
    assert all(len(tokens) == 3 for tokens in runner_greedy(runner, [[5, 6, 7]], 3))


@pytest.mark.parametrize("block", [None, 16])
def test_dummy_weights_of_an_fp8_checkpoints_config(tmp_path: Path, block: int | None) -> None:
    """A published fp8 model's config with --load-format dummy: fp8 weights and scales made
    at random in their checkpoint layouts (compressed-tensors, or block-wise)."""
    dims = {**TINY_DIMS, "hidden_size": 128, "intermediate_size": 256}
    transformers.LlamaConfig(**dims).save_pretrained(tmp_path)
    quantization = _compressed_tensors_config(False) if block is None else fine_grained_fp8_config(block)
    set_quantization_config(tmp_path, quantization)
    config = WorkerConfig(model_path=tmp_path, device="cpu", num_kv_blocks=8, load_format="dummy")
    runner = ModelRunner(config)
    assert runner.model_config.quantization.prequantized
    assert all(len(tokens) == 3 for tokens in runner_greedy(runner, [[5, 6, 7]], 3))


def test_fp8_checkpoints_of_fused_phi3_projections_are_refused(tmp_path: Path) -> None:
    transformers.Phi3Config(**TINY_DIMS).save_pretrained(tmp_path)
    set_quantization_config(tmp_path, fine_grained_fp8_config(16))
    config = WorkerConfig(model_path=tmp_path, device="cpu", num_kv_blocks=8, load_format="dummy")
    with pytest.raises(ValueError, match="fp8 checkpoints of model_type phi3 are not implemented"):
        ModelRunner(config)
