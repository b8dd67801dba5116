"""Quantization methods of the linear layers: how a layer's weights are created, loaded
(each rank's shard of each checkpoint tensor) and applied.

A layer (gpu_worker/model/layers.Linear and its tensor-parallel kinds) owns a method when
the worker serves quantized. It tells the method where its shards come from:
`checkpoint_output_slice(shard_id)` gives (offset in the layer's outputs, size, index of
that size's slice in the checkpoint tensor), `input_shard_index` which slice of the
inputs it holds (row-parallel), both in unpacked feature counts.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from gpu_worker.kernels.int4_linear import PACK_FACTOR, int4_linear
from gpu_worker.kernels.w8a8 import Fp8Rows, quantize_rows, takes_fp8_rows, w8a8_linear
from gpu_worker.model.quantization.config import QuantizationConfig
from gpu_worker.model.quantization.int4_formats import (
    awq_to_common,
    gptq_to_common,
    tensor_shape,
    tensor_specs,
)


class QuantizedLayer(Protocol):
    input_size: int
    output_size: int
    input_shard_index: int

    def checkpoint_output_slice(self, shard_id: str | None) -> tuple[int, int, int]: ...


class QuantMethod:
    """`layer` is Any below: a method adds and reads parameters of its own on the layer,
    which nn.Module's static type does not know."""

    # True: the method creates the layer's parameters (checkpoint layouts); False: the
    # layer keeps its unquantized weight until process_after_loading converts it.
    creates_weights = False

    def create_weights(self, layer: Any) -> None:
        raise NotImplementedError

    def process_after_loading(self, layer: Any) -> None:
        """Turns the loaded tensors into what apply() reads, once, after loading."""

    def apply(self, layer: Any, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        """x: Fp8Rows only where takes_fp8_rows said so."""
        raise NotImplementedError

    def takes_fp8_rows(self, num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether apply() takes these activations as Fp8Rows (kernels/w8a8.py)."""
        return False


class W8A8Method(QuantMethod):
    """int8 or fp8 weights with per-output-channel scales, computed from the loaded
    bf16/fp32 weight: under tensor parallelism from each rank's shard, which holds whole
    output channels (column-parallel) or its slice of them (row-parallel, whose channel
    scale then is the shard's)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def process_after_loading(self, layer: Any) -> None:
        weight, scale = quantize_rows(layer.weight.data, self.kind)
        del layer.weight
        layer.weight = None
        layer.weight_q = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.view(-1), requires_grad=False)

    def apply(self, layer: Any, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        return w8a8_linear(x, layer.weight_q, layer.weight_scale, bias, self.kind)

    def takes_fp8_rows(self, num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        return takes_fp8_rows(self.kind, num_rows, dtype, device)


class Int4Method(QuantMethod):
    """AWQ or GPTQ 4-bit weights, loaded as the checkpoint stores them and converted to
    the kernels' common layout after loading."""

    creates_weights = True

    def __init__(self, config: QuantizationConfig) -> None:
        self.config = config

    def create_weights(self, layer: Any) -> None:
        in_features, out_features = layer.input_size, layer.output_size
        group_size = self.config.group_size
        if group_size > 0 and in_features % group_size:
            raise ValueError(
                f"{self.config.method}: a projection's {in_features} input features (per rank) "
                f"are not a multiple of group_size {group_size}"
            )
        if out_features % PACK_FACTOR or in_features % PACK_FACTOR:
            raise ValueError(
                f"{self.config.method}: projection of {in_features} x {out_features} features "
                f"(per rank) is not a multiple of {PACK_FACTOR} on each side"
            )
        groups = in_features // group_size if group_size > 0 else 1
        for spec in tensor_specs(self.config.method, grouped=group_size > 0):
            dtype = torch.int32 if spec.integer else torch.get_default_dtype()
            shape = tensor_shape(spec, in_features, out_features, groups)
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            param.spec = spec  # type: ignore[attr-defined]  # read by the loader below
            param.weight_loader = _quantized_loader(layer)  # type: ignore[attr-defined]  # a loader hook
            if spec.name == "g_idx":
                param.dummy_fill = _positional_g_idx(group_size)  # type: ignore[attr-defined]  # random weights
            layer.register_parameter(spec.name, param)

    def process_after_loading(self, layer: Any) -> None:
        params: dict[str, torch.Tensor] = {
            name: param
            for name in ("qweight", "qzeros", "scales", "g_idx")
            if (param := layer._parameters.pop(name, None)) is not None
        }
        if self.config.method == "awq":
            common = awq_to_common(
                params["qweight"], params["qzeros"], params["scales"], self.config.group_size
            )
        else:
            common = gptq_to_common(
                params["qweight"],
                params["qzeros"],
                params["scales"],
                params["g_idx"],
                self.config.group_size,
                self.config.desc_act,
            )
        for name in ("qweight", "scales", "zeros", "g_idx"):
            layer.register_buffer(name, getattr(common, name).contiguous(), persistent=False)
        # Groups in input order (AWQ, GPTQ without act_order) open the split-K kernel.
        group_size = self.config.group_size
        positional = torch.arange(len(common.g_idx), device=common.g_idx.device) // max(group_size, 1)
        in_order = group_size > 0 and torch.equal(common.g_idx.long(), positional)
        layer.int4_group_size = group_size if in_order else 0

    def apply(self, layer: Any, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        assert isinstance(x, torch.Tensor), "4-bit projections take no fp8 rows"
        return int4_linear(
            x, layer.qweight, layer.scales, layer.zeros, layer.g_idx, bias, layer.int4_group_size
        )


def _positional_g_idx(group_size: int):
    def fill(param: nn.Parameter) -> None:
        group = group_size if group_size > 0 else param.shape[0]
        param.copy_(torch.arange(param.shape[0], device=param.device) // group)

    return fill


def _quantized_loader(layer: QuantizedLayer):
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        load_quantized_tensor(layer, param, loaded, shard_id)

    return load


def load_quantized_tensor(
    layer: QuantizedLayer, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None
) -> None:
    """Copies this rank's part of checkpoint tensor `loaded` into its place in `param`:
    along the output dim the shard's slice (packed dims counted in int32 words), along
    the input dim the rank's slice. A tensor without an output dim (g_idx) is the same
    for every projection of a fused layer, which is checked."""
    spec = param.spec  # type: ignore[attr-defined]  # set by create_weights
    destination = param.data
    if spec.output_dim is not None:
        offset, size, index = layer.checkpoint_output_slice(shard_id)
        if spec.packed_dim == spec.output_dim:
            offset, size = offset // PACK_FACTOR, size // PACK_FACTOR
        loaded = _narrow_checked(loaded, spec.output_dim, index, size, spec.name)
        destination = destination.narrow(spec.output_dim, offset, size)
    if spec.input_dim is not None:
        size = destination.shape[spec.input_dim]
        loaded = _narrow_checked(loaded, spec.input_dim, layer.input_shard_index, size, spec.name)
    if destination.shape != loaded.shape:
        raise ValueError(
            f"{spec.name}: expected {tuple(destination.shape)} for shard {shard_id!r}, "
            f"checkpoint has {tuple(loaded.shape)}"
        )
    seen: set[str | None] = param.__dict__.setdefault("loaded_shards", set())
    if (
        spec.output_dim is None
        and seen
        and not torch.equal(destination, loaded.to(destination.device, destination.dtype))
    ):
        raise ValueError(f"{spec.name} of shard {shard_id!r} differs from the fused projections' others")
    destination.copy_(loaded)
    seen.add(shard_id)


def _narrow_checked(tensor: torch.Tensor, dim: int, index: int, size: int, name: str) -> torch.Tensor:
    if tensor.dim() <= dim or tensor.shape[dim] < (index + 1) * size:
        raise ValueError(
            f"{name}: checkpoint tensor {tuple(tensor.shape)} has no slice {index} of {size} along dim {dim}"
        )
    return tensor.narrow(dim, index * size, size)


def make_quant_method(config: QuantizationConfig | None) -> QuantMethod | None:
    if config is None:
        return None
    if config.weight_only:
        return Int4Method(config)
    if config.prequantized:
        # Imported here: those methods build on this module's.
        from gpu_worker.model.quantization.fp8_checkpoints import fp8_checkpoint_method

        return fp8_checkpoint_method(config)
    return W8A8Method(config.method)


def process_quantized_weights(model: nn.Module) -> None:
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_after_loading(module)
