"""4-bit checkpoints made from an unquantized one, for the tests and the perplexity
benchmark: a weight quantized group-wise with zero points, and
packed the way AutoAWQ (GEMM version) and auto-gptq ("gptq" format) write their tensors,
written out loop by loop as those tools do rather than by the engine's own unpacking.

quantize_int4 also returns the dequantized weight, which is what a model built from the
checkpoint must compute with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Int4Quantized:
    values: torch.Tensor  # int64 [K, N] in [0, 16)
    zeros: torch.Tensor  # int64 [G, N]
    scales: torch.Tensor  # float16 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    dequantized: torch.Tensor  # float32 [N, K]


def quantize_int4(weight: torch.Tensor, group_size: int, order: torch.Tensor | None = None) -> Int4Quantized:
    """Asymmetric min-max quantization of weight [N, K] in groups of group_size inputs,
    taken in `order` (GPTQ act_order) or in position order. Zero points lie in [1, 15],
    which the "gptq" format's stored-minus-one zeros can hold."""
    out_features, in_features = weight.shape
    order = torch.arange(in_features) if order is None else order
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group_size).to(torch.int32)
    groups = in_features // group_size
    w = weight.t().float()  # [K, N]
    scales = torch.empty(groups, out_features)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    for group in range(groups):
        rows = w[g_idx == group]
        low, high = rows.min(dim=0).values.clamp(max=0), rows.max(dim=0).values.clamp(min=0)
        scale = ((high - low) / 15).clamp(min=1e-6).half().float()
        scales[group] = scale
        zeros[group] = (-low / scale).round().clamp(1, 15).long()
    s, z = scales[g_idx.long()], zeros[g_idx.long()]
    values = (w / s + z).round().clamp(0, 15).long()
    dequantized = ((values - z) * s).t().contiguous()
    return Int4Quantized(values, zeros, scales.half(), g_idx, dequantized)


def pack_awq(q: Int4Quantized) -> dict[str, torch.Tensor]:
    def pack_columns(intweight: torch.Tensor) -> torch.Tensor:
        packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
        intweight = intweight.to(torch.int32)
        for col in range(intweight.shape[1] // 8):
            for i in range(8):
                packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
        return packed

    return {"qweight": pack_columns(q.values), "qzeros": pack_columns(q.zeros), "scales": q.scales}


def pack_gptq(q: Int4Quantized) -> dict[str, torch.Tensor]:
    intweight = q.values.numpy().astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(8):
            qweight[row] |= intweight[row * 8 + j] << (4 * j)
    zeros = (q.zeros - 1).numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + j] << (4 * j)
    return {
        "qweight": torch.from_numpy(qweight.astype(np.int32)),
        "qzeros": torch.from_numpy(qzeros.astype(np.int32)),
        "scales": q.scales,
        "g_idx": q.g_idx,
    }


def _input_order(name: str, in_features: int, act_order: bool) -> torch.Tensor | None:
    """act_order: a permutation per layer input, shared by the projections that read it
    (q/k/v, gate/up), as GPTQ's Hessian of that input gives them one."""
    if not act_order:
        return None
    layer = int(name.split(".")[2])
    reader = next(p for p in QUANTIZED_PROJECTIONS if f".{p}." in name)
    shared_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(reader, reader)
    seed = layer * 16 + QUANTIZED_PROJECTIONS.index(shared_input)
    return torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))


def write_int4_checkpoint(
    model_dir: Path, method: str, group_size: int, act_order: bool = False
) -> dict[str, torch.Tensor]:
    """Rewrites the unquantized checkpoint in `model_dir` as an AWQ or GPTQ one; returns
    the dequantized weights, by checkpoint name, for the reference model."""
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not name.endswith(".weight") or not any(f".{p}." in name for p in QUANTIZED_PROJECTIONS):
            quantized[name] = tensor
            continue
        q = quantize_int4(tensor, group_size, _input_order(name, tensor.shape[1], act_order))
        prefix = name.removesuffix("weight")
        packed = pack_awq(q) if method == "awq" else pack_gptq(q)
        quantized.update({prefix + key: value for key, value in packed.items()})
        dequantized[name] = q.dequantized
    save_file(quantized, str(path), metadata={"format": "pt"})
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if method == "awq":
        config["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }
    else:
        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": act_order,
            "sym": False,
            "checkpoint_format": "gptq",
        }
    config_path.write_text(json.dumps(config))
    return dequantized
