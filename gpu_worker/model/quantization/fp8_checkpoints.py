"""fp8 checkpoints as they are published: their weights and scales read as stored.

compressed-tensors (llm-compressor's W8A8 "float-quantized"): `weight` [out, in] in float8
e4m3 and `weight_scale`, [out, 1] per channel or one per tensor (each projection of a
fused layer brings its own, spread over its channels); run as load-time fp8 is, with
dynamic per-token activation scales.

HF's fine-grained fp8 (`quant_method: fp8`, `weight_block_size` [bn, bk]): `weight` and
`weight_scale_inv` [out / bn, in / bk], one scale per block. On CUDA kept as stored and
multiplied by gpu_worker/kernels/block_fp8.py with unquantized activations; elsewhere
dequantized once after loading into the model's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.kernels.block_fp8 import block_fp8_linear, dequantize_blocks
from gpu_worker.kernels.w8a8 import FP8_DTYPE, Fp8Rows
from gpu_worker.model.quantization.config import QuantizationConfig
from gpu_worker.model.quantization.int4_formats import QuantTensorSpec
from gpu_worker.model.quantization.methods import (
    QuantizedLayer,
    QuantMethod,
    W8A8Method,
    _quantized_loader,
    load_quantized_tensor,
)

# --load-format dummy: fp8 values across their range, scales that keep weights near 1e-3.
_DUMMY_SCALE = 1e-3 / 448.0


def fp8_checkpoint_method(config: QuantizationConfig) -> QuantMethod:
    if config.weight_block is not None:
        return Fp8BlockCheckpointMethod(config.weight_block)
    return Fp8CheckpointMethod()


def _register(layer: Any, name: str, shape: tuple[int, ...], dtype: torch.dtype, loader: Any) -> None:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]  # a loader hook
    if dtype == FP8_DTYPE:
        param.spec = QuantTensorSpec(name, False, 0, 1)  # type: ignore[attr-defined]  # read by the loader
        param.dummy_fill = fill_dummy_fp8  # type: ignore[attr-defined]  # random weights
    else:
        param.spec = QuantTensorSpec(name, False, 0, None)  # type: ignore[attr-defined]  # read by the loader
        param.dummy_fill = fill_dummy_scale  # type: ignore[attr-defined]  # random weights
    layer.register_parameter(name, param)


def fill_dummy_fp8(param: nn.Parameter) -> None:
    param.data.copy_(torch.empty(param.shape, device=param.device).uniform_(-448.0, 448.0).to(FP8_DTYPE))


def fill_dummy_scale(param: nn.Parameter) -> None:
    param.data.fill_(_DUMMY_SCALE)


class Fp8CheckpointMethod(W8A8Method):
    """A compressed-tensors fp8 checkpoint's layers (the module's docstring)."""

    creates_weights = True

    def __init__(self) -> None:
        super().__init__("fp8")

    def create_weights(self, layer: Any) -> None:
        del layer.weight  # Linear's placeholder None: the checkpoint's name is taken here
        _register(layer, "weight", (layer.output_size, layer.input_size), FP8_DTYPE, _quantized_loader(layer))
        _register(layer, "weight_scale", (layer.output_size,), torch.float32, _scale_loader(layer))

    def process_after_loading(self, layer: Any) -> None:
        weight = layer._parameters.pop("weight")
        scale = layer._parameters.pop("weight_scale")
        layer.weight = None
        layer.weight_q = nn.Parameter(weight.data, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.data, requires_grad=False)


def _scale_loader(layer: QuantizedLayer):
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        loaded = loaded.float().reshape(-1)
        if loaded.numel() == 1:
            # A per-tensor scale: the same for every output channel of this projection.
            _, size, index = layer.checkpoint_output_slice(shard_id)
            loaded = loaded.expand((index + 1) * size)
        load_quantized_tensor(layer, param, loaded, shard_id)

    return load


class Fp8BlockCheckpointMethod(QuantMethod):
    """A fine-grained fp8 checkpoint's layers (the module's docstring). Each projection's
    outputs and each rank's inputs must hold whole blocks, as the published models' do."""

    creates_weights = True

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def create_weights(self, layer: Any) -> None:
        block_out, block_in = self.block
        if layer.output_size % block_out or layer.input_size % block_in:
            raise ValueError(
                f"fp8 weight_block_size {list(self.block)}: a projection of {layer.input_size} x "
                f"{layer.output_size} features (per rank) does not hold whole blocks"
            )
        del layer.weight  # Linear's placeholder None: the checkpoint's name is taken here
        # The model's dtype, which the loading context sets and the dequantized weight takes.
        layer.dequantized_dtype = torch.get_default_dtype()
        _register(layer, "weight", (layer.output_size, layer.input_size), FP8_DTYPE, _quantized_loader(layer))
        grid = (layer.output_size // block_out, layer.input_size // block_in)
        _register(layer, "weight_scale_inv", grid, torch.float32, _block_scale_loader(layer, self.block))

    def process_after_loading(self, layer: Any) -> None:
        weight = layer._parameters.pop("weight").data
        scale = layer._parameters.pop("weight_scale_inv").data
        if weight.is_cuda:
            layer.weight = None
            layer.weight_q = nn.Parameter(weight, requires_grad=False)
            layer.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        else:
            dequantized = dequantize_blocks(weight, scale, self.block).to(layer.dequantized_dtype)
            layer.weight = nn.Parameter(dequantized, requires_grad=False)

    def apply(self, layer: Any, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        assert isinstance(x, torch.Tensor), "block-scaled projections take no fp8 rows"
        if layer.weight is not None:
            return F.linear(x, layer.weight, bias)
        return block_fp8_linear(x, layer.weight_q, layer.weight_scale_inv, self.block, bias)


def _block_scale_loader(layer: QuantizedLayer, block: tuple[int, int]):
    block_out, block_in = block

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        offset, size, index = layer.checkpoint_output_slice(shard_id)
        if offset % block_out or size % block_out:
            raise ValueError(f"fp8 weight_block_size {list(block)}: shard {shard_id!r} splits a block")
        rows, columns = size // block_out, param.shape[1]
        part = loaded.float().narrow(0, index * rows, rows)
        part = part.narrow(1, layer.input_shard_index * columns, columns)
        param.data.narrow(0, offset // block_out, rows).copy_(part)

    return load
