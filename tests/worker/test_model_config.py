"""What ModelConfig reads from each architecture's config.json, what it refuses, and a model
built from config.json alone."""

from __future__ import annotations

import math

import pytest
import torch
from pagedserve.v1 import common_pb2, worker_pb2
from safetensors.torch import save_file

from gpu_worker.config import WorkerConfig
from gpu_worker.model.config import ModelConfig, RopeScaling
from gpu_worker.model.layers import RotaryEmbedding
from gpu_worker.model.loader import iter_safetensors
from gpu_worker.model_runner import ModelRunner
from tests.support.tiny_architectures import build_tiny_model
from tests.support.tiny_llama import TINY_DIMS


def _config(model_type: str, **extra: object) -> ModelConfig:
    return ModelConfig.from_dicts(dict(TINY_DIMS, model_type=model_type, **extra))


def test_qwen2_biases_qkv_but_not_o_proj() -> None:
    config = _config("qwen2")
    assert config.qkv_bias and not config.attention_bias
    llama = _config("llama", attention_bias=True)
    assert llama.qkv_bias and llama.attention_bias


def test_sliding_windows_per_layer() -> None:
    assert _config("mistral", sliding_window=None).sliding_windows == ()
    assert _config("mistral", sliding_window=7).sliding_windows == (7, 7)
    # Qwen2 lists a window it does not use unless use_sliding_window says so.
    assert _config("qwen2", sliding_window=7, use_sliding_window=False).sliding_windows == ()
    # Gemma 2 configs without layer_types alternate, a windowed layer first.
    gemma2 = _config("gemma2", sliding_window=7, num_hidden_layers=4)
    assert gemma2.sliding_windows == (7, None, 7, None)
    gemma3 = _config("gemma3_text", sliding_window=7, num_hidden_layers=7, sliding_window_pattern=3)
    assert gemma3.sliding_windows == (7, 7, None, 7, 7, None, 7)
    with pytest.raises(ValueError, match="layer_types"):
        _config("gemma2", sliding_window=7, layer_types=["sliding_attention"])


def test_gemma3_reads_a_rope_base_per_layer_type() -> None:
    config = _config(
        "gemma3_text",
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
    assert config.rope_theta == 1e6 and config.rope_scaling is not None
    assert config.rope_scaling.factor == 8.0
    assert (config.local_rope_theta, config.local_rope_scaling) == (1e4, None)
    older = _config("gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4)
    assert (older.rope_theta, older.local_rope_theta) == (1e6, 1e4)
    assert older.tie_word_embeddings and older.use_qk_norm


def test_attention_scale_follows_query_pre_attn_scalar() -> None:
    assert _config("gemma2", head_dim=16, query_pre_attn_scalar=64).attention_scale == 64**-0.5
    assert _config("llama", head_dim=16).attention_scale == 16**-0.5


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_type", "gpt2", "unsupported model_type 'gpt2'"),
        ("hidden_act", "relu", "unsupported hidden_act 'relu'"),
        ("rope_scaling", {"rope_type": "ntk", "factor": 2.0}, "unsupported rope scaling 'ntk'"),
        (
            "quantization_config",
            {"quant_method": "bitsandbytes"},
            "unsupported quantization_config .quant_method 'bitsandbytes'",
        ),
    ],
)
def test_unsupported_options_are_refused_by_name(field: str, value: object, message: str) -> None:
    raw = dict(TINY_DIMS, model_type="llama")
    raw[field] = value
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dicts(raw)


def test_moe_layers_and_routing() -> None:
    mixtral = _config("mixtral", num_local_experts=8, num_experts_per_tok=2)
    assert mixtral.moe_layers == (True, True) and mixtral.norm_topk_prob
    assert (mixtral.num_experts, mixtral.moe_intermediate_size) == (8, TINY_DIMS["intermediate_size"])
    qwen3_moe = _config(
        "qwen3_moe",
        num_hidden_layers=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
    )
    assert qwen3_moe.moe_layers == (False, True, False, False)
    assert not qwen3_moe.norm_topk_prob and qwen3_moe.moe_intermediate_size == 32
    with pytest.raises(ValueError, match="num_experts_per_tok 9"):
        _config("mixtral", num_local_experts=8, num_experts_per_tok=9)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi3", "qwen3_moe"])
def test_dummy_weights_need_only_the_config(tmp_path, model_type: str) -> None:
    """load_format "dummy": no weight file is read, and the model runs a step."""
    build_tiny_model(model_type).config.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    config = WorkerConfig(model_path=tmp_path, device="cpu", num_kv_blocks=8, load_format="dummy")
    runner = ModelRunner(config)
    assert all(param.abs().max() <= 1e-3 for param in runner.model.parameters())
    step = worker_pb2.StepRequest(step_id=1)
    step.new_sequences.add(seq_id=1, token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams(temperature=0))
    step.scheduled.add(seq_id=1, num_new_tokens=3, new_block_ids=[0])
    assert len(runner.execute_step(step).token_ids) == 1
    with pytest.raises(ValueError, match="unsupported load_format 'pt'"):
        ModelRunner(WorkerConfig(model_path=tmp_path, device="cpu", num_kv_blocks=8, load_format="pt"))


def test_sharded_checkpoint_loads_the_files_its_index_names(tmp_path) -> None:
    """Shards listed by model.safetensors.index.json load; a stray file beside them (as
    Mistral's consolidated.safetensors) is not read."""
    hf_model = build_tiny_model("mistral")
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    save_file({"layers.0.attention.wq.weight": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))
    names = {name for name, _ in iter_safetensors(tmp_path)}
    assert names == set(hf_model.state_dict())
    runner = ModelRunner(WorkerConfig(model_path=tmp_path, device="cpu", num_kv_blocks=8))
    torch.testing.assert_close(
        runner.model.model.embed_tokens.weight, hf_model.model.embed_tokens.weight, atol=0, rtol=0
    )


def test_longrope_switches_factors_by_position() -> None:
    """Phi-3's LongRoPE: short factors inside the original context, long ones past it,
    both scaled by the attention factor sqrt(1 + ln(factor) / ln(original))."""
    scaling = RopeScaling(
        rope_type="longrope",
        factor=4.0,
        original_max_position_embeddings=8,
        attention_factor=math.sqrt(1 + math.log(4.0) / math.log(8)),
        short_factor=(1.0, 2.0),
        long_factor=(3.0, 5.0),
    )
    table = RotaryEmbedding(4, 16, 100.0, scaling).cos_sin_cache
    for position, factors in ((7, (1.0, 2.0)), (8, (3.0, 5.0)), (15, (3.0, 5.0))):
        angles = torch.tensor([position / factors[0], position / (factors[1] * 10.0)])
        expected = torch.cat([angles.cos(), angles.sin()]) * scaling.attention_factor
        torch.testing.assert_close(table[position], expected)
