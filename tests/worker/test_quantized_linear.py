"""Each quantized linear layer against its dequantized reference: the layer built with its
quantization method, loaded through the parameters' weight_loaders from checkpoint
tensors (for 4-bit ones, packed as AutoAWQ and auto-gptq write them), and under tensor
parallelism each rank's shard (ranks built side by side; their outputs are gathered or
summed here, as the collectives would)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from devtools.int4_checkpoints import pack_awq, pack_gptq, quantize_int4
from gpu_worker.kernels.w8a8 import dequantize_rows, quantize_rows, w8a8_linear, w8a8_linear_reference
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.layers import Linear
from gpu_worker.model.parallel_layers import RowParallelLinear, merged_column_parallel_linear
from gpu_worker.model.quantization.config import QuantizationConfig, resolve_quantization
from gpu_worker.model.quantization.methods import make_quant_method, process_quantized_weights
from gpu_worker.model.quantization.support import check_quantization_supported
from gpu_worker.parallel.config import ParallelConfig
from gpu_worker.parallel.groups import RankGroup
from tests.support.tiny_llama import TINY_DIMS

IN, OUT = 64, 48
GEN = torch.Generator().manual_seed(0)


def _load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], shard_id: str | None = None) -> None:
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            if shard_id is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_w8a8_linear_matches_dequantized_reference(kind: str) -> None:
    weight, bias = torch.randn(OUT, IN, generator=GEN), torch.randn(OUT, generator=GEN)
    x = torch.randn(7, IN, generator=GEN)
    layer = Linear(IN, OUT, bias=True, quant_method=make_quant_method(QuantizationConfig(kind)))
    _load(layer, {"weight": weight, "bias": bias})
    process_quantized_weights(layer)
    w_values, w_scale = quantize_rows(weight, kind)
    x_values, x_scale = quantize_rows(x, kind)
    expected = F.linear(dequantize_rows(x_values, x_scale), dequantize_rows(w_values, w_scale), bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
    # And close to the unquantized layer: the scales are the right way round.
    error = (layer(x) - F.linear(x, weight, bias)).abs().max() / F.linear(x, weight, bias).abs().max()
    assert error < (0.02 if kind == "int8" else 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device GEMMs need CUDA")
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("rows", [1, 16, 33, 256])
def test_w8a8_device_gemm_matches_reference(kind: str, rows: int) -> None:
    weight = torch.randn(512, 1024, device="cuda")
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    values, scale = quantize_rows(weight, kind)
    actual = w8a8_linear(x, values, scale.view(-1), None, kind)
    expected = w8a8_linear_reference(x, values, scale.view(-1), None, kind)
    torch.testing.assert_close(actual.float(), expected.float(), atol=0.1, rtol=2e-2)


def _int4_layer(method: str, group_size: int, act_order: bool) -> tuple[Linear, torch.Tensor]:
    weight = torch.randn(OUT, IN, generator=GEN)
    order = torch.randperm(IN, generator=GEN) if act_order else None
    q = quantize_int4(weight, group_size, order)
    config = QuantizationConfig(method, bits=4, group_size=group_size, desc_act=act_order)
    layer = Linear(IN, OUT, quant_method=make_quant_method(config))
    _load(layer, pack_awq(q) if method == "awq" else pack_gptq(q))
    process_quantized_weights(layer)
    return layer, q.dequantized


@pytest.mark.parametrize(
    ("method", "group_size", "act_order"),
    [("awq", 16, False), ("awq", 64, False), ("gptq", 32, False), ("gptq", 16, True)],
)
def test_int4_linear_matches_dequantized_reference(method: str, group_size: int, act_order: bool) -> None:
    layer, dequantized = _int4_layer(method, group_size, act_order)
    x = torch.randn(5, IN, generator=GEN)
    torch.testing.assert_close(layer(x), F.linear(x, dequantized), atol=1e-4, rtol=1e-5)


def _int4_config(method: str) -> QuantizationConfig:
    return QuantizationConfig(method, bits=4, group_size=16)


def _packed(method: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    q = quantize_int4(weight, 16)
    return (pack_awq(q) if method == "awq" else pack_gptq(q)), q.dequantized


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_tensor_parallel_shards_make_up_the_whole_layer(method: str) -> None:
    """gate/up split by columns and down by rows over two ranks, each loading its shard
    (scales and zeros included) of the same checkpoint tensors."""
    gate, gate_ref = _packed(method, torch.randn(32, IN, generator=GEN))
    up, up_ref = _packed(method, torch.randn(32, IN, generator=GEN))
    down, down_ref = _packed(method, torch.randn(IN, 32, generator=GEN))
    x, hidden = torch.randn(3, IN, generator=GEN), torch.randn(3, 32, generator=GEN)
    gate_up_parts, down_sum = [], torch.zeros(3, IN)
    for rank in range(2):
        tp = RankGroup(ranks=(0, 1), rank=rank)
        method_ = make_quant_method(_int4_config(method))
        gate_up = merged_column_parallel_linear(IN, [("gate", 32), ("up", 32)], tp=tp, quant_method=method_)
        down_proj = RowParallelLinear(32, IN, tp=tp, quant_method=make_quant_method(_int4_config(method)))
        _load(gate_up, gate, "gate")
        _load(gate_up, up, "up")
        _load(down_proj, down)
        process_quantized_weights(gate_up)
        process_quantized_weights(down_proj)
        gate_up_parts.append(gate_up.quant_method.apply(gate_up, x, None).split(16, dim=1))
        down_sum += down_proj.quant_method.apply(down_proj, hidden[:, rank * 16 : (rank + 1) * 16], None)
    tolerance = dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        torch.cat([p[0] for p in gate_up_parts], 1), F.linear(x, gate_ref), **tolerance
    )
    torch.testing.assert_close(torch.cat([p[1] for p in gate_up_parts], 1), F.linear(x, up_ref), **tolerance)
    torch.testing.assert_close(down_sum, F.linear(hidden, down_ref), **tolerance)


def test_w8a8_column_shard_quantizes_its_own_channels() -> None:
    weight = torch.randn(32, IN, generator=GEN)
    x = torch.randn(3, IN, generator=GEN)
    whole = Linear(IN, 32, quant_method=make_quant_method(QuantizationConfig("int8")))
    _load(whole, {"weight": weight})
    process_quantized_weights(whole)
    shard = merged_column_parallel_linear(
        IN,
        [("gate", 32)],
        tp=RankGroup(ranks=(0, 1), rank=1),
        quant_method=make_quant_method(QuantizationConfig("int8")),
    )
    _load(shard, {"weight": weight}, "gate")
    process_quantized_weights(shard)
    torch.testing.assert_close(shard(x), whole(x)[:, 16:])


def _model_config(**overrides: object) -> ModelConfig:
    return ModelConfig.from_dicts({**TINY_DIMS, "model_type": "llama", **overrides})


def test_unsupported_combinations_are_refused_by_name() -> None:
    moe = _model_config(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="quantization int8 with model_type mixtral"):
        check_quantization_supported(QuantizationConfig("int8"), moe, torch.device("cpu"), ParallelConfig())
    act_order = QuantizationConfig("gptq", bits=4, group_size=16, desc_act=True)
    with pytest.raises(ValueError, match="act_order .desc_act. checkpoints with tensor_parallel_size 2"):
        check_quantization_supported(
            act_order,
            _model_config(),
            torch.device("cpu"),
            ParallelConfig(tensor_parallel_size=2, init_method=""),
        )
    with pytest.raises(ValueError, match="--quantization awq needs a checkpoint quantized with awq"):
        resolve_quantization("awq", None)
    assert resolve_quantization("awq", None, load_format="dummy") == QuantizationConfig("awq", 4, 128)
    with pytest.raises(ValueError, match="quantization_config.checkpoint_format 'gptq_v2'"):
        _model_config(quantization_config={"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"})
    with pytest.raises(ValueError, match="only 4-bit awq"):
        _model_config(quantization_config={"quant_method": "awq", "bits": 8, "group_size": 128})
    with pytest.raises(ValueError, match="group_size 128"):
        Linear(64, 32, quant_method=make_quant_method(QuantizationConfig("awq", 4, 128)))


def test_each_row_count_takes_the_4bit_kernel_that_opens_each_weight_fewest_times() -> None:
    from gpu_worker.kernels.int4_linear import fused_int4_kernel

    # Llama-3.1-8B's qkv: AWQ / GPTQ groups of 128 in input order, then act_order (no
    # group size: g_idx says).
    shape = {"in_features": 4096, "out_features": 6144}
    assert fused_int4_kernel(1, **shape, group_size=128) == "gemv"
    assert [fused_int4_kernel(rows, **shape, group_size=128) for rows in (2, 16, 17, 64)] == ["split-k"] * 4
    assert fused_int4_kernel(65, **shape, group_size=128) is None
    assert [fused_int4_kernel(rows, **shape, group_size=0) for rows in (1, 16)] == ["gathered"] * 2
    assert fused_int4_kernel(17, **shape, group_size=0) is None
