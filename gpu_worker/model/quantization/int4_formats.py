"""AWQ and GPTQ checkpoint tensors, and their conversion to the one layout the 4-bit
kernels read (kernels/int4_linear.py).

As AutoAWQ writes them (GEMM version), for a projection of K inputs and N outputs:
qweight int32 [K, N / 8], eight outputs per int32 in the interleaved order AWQ_ORDER;
qzeros int32 [G, N / 8], packed the same way; scales [G, N]. W[n, k] = (q - z) * s.
As auto-gptq and gptqmodel write the "gptq" format: qweight int32 [K / 8, N], eight
inputs per int32 in order; qzeros int32 [G, N / 8], eight outputs per int32 in order,
each stored minus one; scales [G, N]; g_idx int32 [K], each input's group.
G is K / group_size (1 with group_size -1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_worker.kernels.int4_linear import PACK_FACTOR, pack_int4, unpack_int4

# Nibble i of an AWQ int32 holds output column 8 * word + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class QuantTensorSpec:
    """One checkpoint tensor of a quantized projection: its shape for `in_features` x
    `out_features` (this rank's), and which of its dims follow the output and the input
    features (None: neither), for cutting shards out of the checkpoint's."""

    name: str
    integer: bool
    output_dim: int | None
    input_dim: int | None
    # The dim that holds 8 values per element, or None.
    packed_dim: int | None = None


def tensor_specs(method: str, grouped: bool) -> tuple[QuantTensorSpec, ...]:
    """`grouped`: scales and zeros have a row per input group; else one row for all
    inputs, which every tensor-parallel rank then holds whole."""
    group_dim = 0 if grouped else None
    if method == "awq":
        return (
            QuantTensorSpec("qweight", True, output_dim=1, input_dim=0, packed_dim=1),
            QuantTensorSpec("qzeros", True, output_dim=1, input_dim=group_dim, packed_dim=1),
            QuantTensorSpec("scales", False, output_dim=1, input_dim=group_dim),
        )
    return (
        QuantTensorSpec("qweight", True, output_dim=1, input_dim=0, packed_dim=0),
        QuantTensorSpec("qzeros", True, output_dim=1, input_dim=group_dim, packed_dim=1),
        QuantTensorSpec("scales", False, output_dim=1, input_dim=group_dim),
        QuantTensorSpec("g_idx", True, output_dim=None, input_dim=0),
    )


def tensor_shape(spec: QuantTensorSpec, in_features: int, out_features: int, groups: int) -> tuple[int, ...]:
    if spec.name == "g_idx":
        return (in_features,)
    rows = in_features if spec.name == "qweight" else groups
    shape = [rows, out_features]
    if spec.packed_dim is not None:
        shape[spec.packed_dim] //= PACK_FACTOR
    return tuple(shape)


def _awq_unpack_outputs(packed: torch.Tensor) -> torch.Tensor:
    """[rows, N / 8] AWQ-packed -> [rows, N] in natural column order."""
    values = unpack_int4(packed, dim=1)
    inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(PACK_FACTOR)], device=packed.device)
    words = torch.arange(0, values.shape[1], PACK_FACTOR, device=packed.device)
    return values[:, (words[:, None] + inverse[None, :]).flatten()]


@dataclass(frozen=True)
class Int4Weight:
    """A projection's 4-bit weight in the kernels' common layout."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor


def awq_to_common(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> Int4Weight:
    in_features = qweight.shape[0]
    values = _awq_unpack_outputs(qweight)  # [K, N]
    zeros = _awq_unpack_outputs(qzeros).to(scales.dtype)
    g_idx = _positional_groups(in_features, group_size, qweight.device)
    return Int4Weight(pack_int4(values, dim=0), scales, zeros, g_idx)


def gptq_to_common(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    group_size: int,
    desc_act: bool,
) -> Int4Weight:
    """Without act_order the groups follow the positions: they are recomputed, because a
    row-parallel shard's checkpoint g_idx counts the groups of the whole row."""
    # The "gptq" format stores each zero point minus one.
    zeros = (unpack_int4(qzeros, dim=1) + 1).to(scales.dtype)
    if not desc_act:
        g_idx = _positional_groups(qweight.shape[0] * PACK_FACTOR, group_size, qweight.device)
    return Int4Weight(qweight, scales, zeros, g_idx.to(torch.int32))


def _positional_groups(in_features: int, group_size: int, device: torch.device) -> torch.Tensor:
    group = group_size if group_size > 0 else in_features
    return torch.arange(in_features, dtype=torch.int32, device=device) // group
