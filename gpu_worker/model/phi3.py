"""Phi-3: the Llama decoder, with q/k/v and gate/up stored fused in the checkpoint.

The engine fuses the same projections, but per tensor-parallel rank: each rank's fused
matrix holds its own heads of q, k and v. So the checkpoint's fused tensors are split back
into the projections they stand for at load, and every rank cuts its shard from each.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gpu_worker.model.decoder import DecoderForCausalLM


class Phi3ForCausalLM(DecoderForCausalLM):
    def split_checkpoint_tensor(
        self, checkpoint_name: str, tensor: torch.Tensor
    ) -> Iterable[tuple[str, torch.Tensor]]:
        config = self.config
        if ".self_attn.qkv_proj." in checkpoint_name:
            q_size = config.num_attention_heads * config.head_dim
            kv_size = config.num_key_value_heads * config.head_dim
            parts = tensor.split([q_size, kv_size, kv_size], dim=0)
            return [
                (checkpoint_name.replace(".qkv_proj.", f".{name}_proj."), part)
                for name, part in zip("qkv", parts, strict=True)
            ]
        if ".mlp.gate_up_proj." in checkpoint_name:
            gate, up = tensor.chunk(2, dim=0)
            return [
                (checkpoint_name.replace(".gate_up_proj.", ".gate_proj."), gate),
                (checkpoint_name.replace(".gate_up_proj.", ".up_proj."), up),
            ]
        return ((checkpoint_name, tensor),)
