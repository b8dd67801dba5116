"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE.

The shared decoder with the MLP of some layers (ModelConfig.moe_layers) replaced by a
router and stacked experts. Checkpoints store each expert's projections separately; each
loads into its expert's rows of the stacked weights (loader: `.experts.N.` names).

Under tensor parallelism every rank holds every expert, with its slice of each expert's
intermediate features, and the experts' summed output is all-reduced like a dense MLP's.
Expert parallelism (whole experts per rank) would change only FusedMoE: the router and the
layer around it stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gpu_worker.kernels.moe import fused_moe, route
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.decoder import DecoderForCausalLM, DecoderLayer, GatedMLP
from gpu_worker.model.layers import Linear, WeightLoader, new_parameter
from gpu_worker.parallel.groups import SINGLE_RANK, RankGroup


class ExpertWeights(nn.Module):
    """Every expert's projections stacked, under the names that loader.py maps each
    expert's checkpoint tensors to: gate_up_proj [E, 2 * I, H] (gate rows, then up rows)
    and down_proj [E, H, I], I being this rank's slice of the intermediate features."""

    def __init__(self, config: ModelConfig, local_size: int, weight_loader: WeightLoader) -> None:
        super().__init__()
        experts = range(config.num_experts)
        self.gate_up_proj = new_parameter(
            config.num_experts, 2 * local_size, config.hidden_size, weight_loader=weight_loader
        )
        self.gate_up_proj.shard_ids = tuple(f"{e}.{p}" for e in experts for p in ("gate", "up"))  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field
        self.down_proj = new_parameter(
            config.num_experts, config.hidden_size, local_size, weight_loader=weight_loader
        )
        self.down_proj.shard_ids = tuple(f"{e}.down" for e in experts)  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field


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
        """shard_id "E.gate", "E.up" or "E.down": expert E's [I, H] or [H, I] tensor, of
        which this rank keeps its slice of the intermediate features."""
        if shard_id is None or shard_id not in param.shard_ids:  # type: ignore[attr-defined]
            raise ValueError(f"expected an expert shard id like '0.gate', got {shard_id!r}")
        expert, part = shard_id.split(".")
        size, start = self.local_size, self.tp.rank * self.local_size
        if part == "down":
            source, destination = loaded_weight[:, start : start + size], param.data[int(expert)]
        else:
            offset = 0 if part == "gate" else size
            source = loaded_weight[start : start + size]
            destination = param.data[int(expert), offset : offset + size]
        if source.shape != destination.shape:
            raise ValueError(
                f"expert shard {shard_id!r}: expected {tuple(destination.shape)} of the checkpoint's "
                f"{tuple(loaded_weight.shape)}"
            )
        destination.copy_(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        output = fused_moe(
            x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids, self.hidden_act
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
