"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE.

The shared decoder with the MLP of some layers (ModelConfig.moe_layers) replaced by a
router and stacked experts. Checkpoints store each expert's projections separately; each
loads into its expert's rows of the stacked weights (loader: `.experts.N.` names).

Under tensor parallelism every rank holds every expert, with its slice of each expert's
intermediate features, and the experts' summed output is all-reduced like a dense MLP's.
A fine-grained fp8 checkpoint's experts stay fp8 on CUDA, beside their block scales
(`_scale_inv` of each stacked weight); on CPU they are dequantized once after loading.
Expert parallelism (whole experts per rank) would change only FusedMoE: the router and the
layer around it stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gpu_worker.kernels.block_fp8 import dequantize_blocks
from gpu_worker.kernels.moe import ExpertScales, fused_moe, route
from gpu_worker.kernels.w8a8 import FP8_DTYPE
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.decoder import DecoderForCausalLM, DecoderLayer, GatedMLP
from gpu_worker.model.layers import Linear, WeightLoader, new_parameter
from gpu_worker.model.quantization.fp8_checkpoints import fill_dummy_fp8, fill_dummy_scale
from gpu_worker.parallel.groups import SINGLE_RANK, RankGroup


class ExpertWeights(nn.Module):
    """Every expert's projections stacked, under the names that loader.py maps each
    expert's checkpoint tensors to: gate_up_proj [E, 2 * I, H] (gate rows, then up rows)
    and down_proj [E, H, I], I being this rank's slice of the intermediate features."""

    def __init__(self, config: ModelConfig, local_size: int, weight_loader: WeightLoader) -> None:
        super().__init__()
        experts = range(config.num_experts)
        gate_up_ids = tuple(f"{e}.{p}" for e in experts for p in ("gate", "up"))
        down_ids = tuple(f"{e}.down" for e in experts)
        gate_up_shape = (config.num_experts, 2 * local_size, config.hidden_size)
        down_shape = (config.num_experts, config.hidden_size, local_size)
        quantization = config.quantization
        # (rows, columns) of a fine-grained fp8 checkpoint's blocks; None: unquantized.
        self.block = quantization.weight_block if quantization is not None else None
        self.dtype = torch.get_default_dtype()
        if self.block is None:
            self.gate_up_proj = new_parameter(*gate_up_shape, weight_loader=weight_loader)
            self.down_proj = new_parameter(*down_shape, weight_loader=weight_loader)
        else:
            self.quant_method = _Fp8BlockExperts()
            self.gate_up_proj = _fp8_parameter(gate_up_shape, weight_loader)
            self.down_proj = _fp8_parameter(down_shape, weight_loader)
            self.gate_up_proj_scale_inv = _block_scales(gate_up_shape, self.block, weight_loader, gate_up_ids)
            self.down_proj_scale_inv = _block_scales(down_shape, self.block, weight_loader, down_ids)
        self.gate_up_proj.shard_ids = gate_up_ids  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field
        self.down_proj.shard_ids = down_ids  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field

    def scales(self) -> ExpertScales | None:
        """The block scales of fp8 experts; None for experts in the model's dtype."""
        if self.block is None:
            return None
        return ExpertScales(self.gate_up_proj_scale_inv, self.down_proj_scale_inv, self.block)


def _fp8_parameter(shape: tuple[int, int, int], weight_loader: WeightLoader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=FP8_DTYPE), requires_grad=False)
    param.weight_loader = weight_loader  # type: ignore[attr-defined]  # a loader hook
    param.dummy_fill = fill_dummy_fp8  # type: ignore[attr-defined]  # random weights
    return param


def _block_scales(
    shape: tuple[int, int, int],
    block: tuple[int, int],
    weight_loader: WeightLoader,
    shard_ids: tuple[str, ...],
) -> nn.Parameter:
    """[E, rows / bn, columns / bk]: a rank's rows and columns must hold whole blocks."""
    num_experts, rows, columns = shape
    if rows % block[0] or columns % block[1] or (rows // 2) % block[0]:
        raise ValueError(
            f"fp8 weight_block_size {list(block)}: experts of {rows} x {columns} features (per rank) "
            "do not hold whole blocks"
        )
    param = nn.Parameter(
        torch.empty(num_experts, rows // block[0], columns // block[1], dtype=torch.float32),
        requires_grad=False,
    )
    param.weight_loader = weight_loader  # type: ignore[attr-defined]  # a loader hook
    param.shard_ids = shard_ids  # type: ignore[attr-defined]  # a loader hook
    param.dummy_fill = fill_dummy_scale  # type: ignore[attr-defined]  # random weights
    return param


class _Fp8BlockExperts:
    """process_quantized_weights' hook for fp8 experts: on CPU, where no kernel takes them,
    they are dequantized once into the model's dtype."""

    def process_after_loading(self, experts: ExpertWeights) -> None:
        if experts.block is None or experts.gate_up_proj.is_cuda:
            return
        for name in ("gate_up_proj", "down_proj"):
            scales = experts._parameters.pop(f"{name}_scale_inv")
            assert scales is not None
            weight = dequantize_blocks(getattr(experts, name).data, scales.data, experts.block)
            setattr(experts, name, nn.Parameter(weight.to(experts.dtype), requires_grad=False))
        experts.block = None


class FusedMoE(nn.Module):
    def __init__(self, config: ModelConfig, tp: RankGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.local_size = tp.share_of("moe_intermediate_size", config.moe_intermediate_size)
        self.hidden_act = config.hidden_act
        self.gate = Linear(config.hidden_size, config.num_experts)
        self.experts = ExpertWeights(config, self.local_size, self._load_expert)

    def _load_expert(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None
    ) -> None:
        """shard_id "E.gate", "E.up" or "E.down": expert E's [I, H] or [H, I] tensor (or
        its block scales), of which this rank keeps its slice of the intermediate features:
        as many rows or columns as the rank's destination holds, weights or blocks."""
        if shard_id is None or shard_id not in param.shard_ids:  # type: ignore[attr-defined]
            raise ValueError(f"expected an expert shard id like '0.gate', got {shard_id!r}")
        expert, part = shard_id.split(".")
        destination = param.data[int(expert)]
        if part == "down":
            size = destination.shape[1]
            source = loaded_weight[:, self.tp.rank * size : (self.tp.rank + 1) * size]
        else:
            size = destination.shape[0] // 2
            source = loaded_weight[self.tp.rank * size : (self.tp.rank + 1) * size]
            destination = destination[0 if part == "gate" else size :][:size]
        if source.shape != destination.shape:
            raise ValueError(
                f"expert shard {shard_id!r}: expected {tuple(destination.shape)} of the checkpoint's "
                f"{tuple(loaded_weight.shape)}"
            )
        destination.copy_(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        output = fused_moe(
            x,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            weights,
            ids,
            self.hidden_act,
            self.experts.scales(),
        )
        return self.tp.all_reduce(output) if self.tp.size > 1 else output


class MoEDecoderLayer(DecoderLayer):
    def make_mlp(self, config: ModelConfig, layer_index: int, tp: RankGroup) -> nn.Module:
        if config.is_moe_layer(layer_index):
            return FusedMoE(config, tp)
        return GatedMLP(config, tp)


class MoEForCausalLM(DecoderForCausalLM):
    layer_class = MoEDecoderLayer

    def split_checkpoint_tensor(
        self, checkpoint_name: str, tensor: torch.Tensor
    ) -> Iterable[tuple[str, torch.Tensor]]:
        # Mixtral names its experts' block and projections its own way.
        if ".block_sparse_moe." in checkpoint_name:
            checkpoint_name = checkpoint_name.replace(".block_sparse_moe.", ".mlp.")
            for old, new in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
                checkpoint_name = checkpoint_name.replace(old, new)
        return ((checkpoint_name, tensor),)
