"""The engine's own building blocks for decoder-only transformers.

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that copies
a checkpoint tensor into it. Fused projections (q/k/v, gate/up) load each checkpoint tensor
into their own slice this way, and the tensor-parallel variants load their shard of it the
same way (parallel_layers.py), so the checkpoint loader never needs to know a layer's
internal layout.

Parameters are created uninitialized (torch.empty) on the current default device and dtype:
the loader fills every one and checks that none was missed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.kernels.elementwise import add_rms_norm, add_rms_norm_fp8
from gpu_worker.kernels.w8a8 import Fp8Rows
from gpu_worker.model.config import RopeScaling

if TYPE_CHECKING:
    from gpu_worker.model.quantization.methods import QuantMethod


def refuse_shard_id(param: nn.Parameter, shard_id: str | None) -> None:
    """A loader of a parameter that holds one checkpoint tensor takes no shard id."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not sharded, got {shard_id!r}")


def default_weight_loader(
    param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None
) -> None:
    refuse_shard_id(param, shard_id)
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


WeightLoader = Callable[..., None]


def new_parameter(*shape: int, weight_loader: WeightLoader = default_weight_loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = weight_loader  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field
    return param


class Linear(nn.Module):
    """y = x W^T (+ b), W stored as [output_size, input_size] like the checkpoints.

    With a quantization method the method applies the weight, and one that reads a
    quantized checkpoint creates the weight's tensors instead of `weight` (None then);
    it cuts them out of the checkpoint's by checkpoint_output_slice and
    input_shard_index, which the tensor-parallel kinds override."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant_method: QuantMethod | None = None
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.quant_method = quant_method
        # Which slice of the checkpoint's input features this layer holds (row-parallel).
        self.input_shard_index = 0
        # Typed as always present: only layers without a quantization method read it, and
        # a method that creates its own weights leaves it None.
        self.weight: nn.Parameter
        if quant_method is not None and quant_method.creates_weights:
            self.weight = None  # type: ignore[assignment]
            quant_method.create_weights(self)
        else:
            self.weight = new_parameter(output_size, input_size)
        self.bias = new_parameter(output_size) if bias else None

    def checkpoint_output_slice(self, shard_id: str | None) -> tuple[int, int, int]:
        """(offset in this layer's outputs, size, index of that size's slice of the
        checkpoint tensor's outputs) for checkpoint shard `shard_id`."""
        if shard_id is not None:
            raise ValueError(f"projection of {self.output_size} outputs is not sharded, got {shard_id!r}")
        return 0, self.output_size, 0

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """x: Fp8Rows only where takes_fp8_rows said so."""
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        assert isinstance(x, torch.Tensor)
        return F.linear(x, self.weight, self.bias)

    def takes_fp8_rows(self, num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this many rows of activations are best handed over already quantized to
        fp8 by the kernel that makes them (an fp8 projection's per-token quantization,
        fused into the norm or activation before it)."""
        return self.quant_method is not None and self.quant_method.takes_fp8_rows(num_rows, dtype, device)


class PartialSumLinear(Linear):
    """A projection read only by an add + RMSNorm (attention's o_proj, the MLP's down_proj).

    With few rows on CUDA it returns fp32 split-K partial sums, [splits, T, output_size],
    which the norm adds up as it loads them: narrow projections then keep every
    multiprocessor streaming weights (kernels/triton_linear.py). Otherwise [T, output_size].
    """

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.is_cuda and self.bias is None and self.quant_method is None:
            from gpu_worker.kernels.triton_linear import linear_partial_sums, split_k_plan

            plan = split_k_plan(x.shape[0], self.output_size, self.input_size)
            if plan is not None:
                return linear_partial_sums(x, self.weight, **plan)
        return super().forward(x)


class MergedLinear(Linear):
    """Several projections of the same input fused into one matmul (q/k/v, gate/up).

    `shards` names each projection and its output size, in output order; the checkpoint
    holds them separately and each is loaded into its rows by shard id.
    """

    def __init__(
        self,
        input_size: int,
        shards: Sequence[tuple[str, int]],
        bias: bool = False,
        quant_method: QuantMethod | None = None,
    ) -> None:
        super().__init__(input_size, sum(size for _, size in shards), bias, quant_method)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shards:
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field
        for param in self.parameters(recurse=False):
            param.shard_ids = tuple(self.shard_offsets)  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field

    def checkpoint_output_slice(self, shard_id: str | None) -> tuple[int, int, int]:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        return offset, size, 0

    def _load_shard(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        destination = param.data.narrow(0, offset, size)
        if destination.shape != loaded_weight.shape:
            raise ValueError(
                f"shard {shard_id!r}: expected {tuple(destination.shape)}, "
                f"checkpoint has {tuple(loaded_weight.shape)}"
            )
        destination.copy_(loaded_weight)

    def split(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output.split([size for _, size in self.shard_offsets.values()], dim=-1))


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = new_parameter(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the activation dtype, as the models were trained.
        return add_rms_norm(x, None, self.weight, self.eps)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual) in one pass over the activations."""
        out, summed = add_rms_norm(x, residual, self.weight, self.eps)
        assert summed is not None, "add_rms_norm returns the sum whenever a residual is given"
        return out, summed

    def norm_for(
        self, projection: Linear | None, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """(norm(x + residual), x + residual) as the input of `projection` (None: of no single
        projection): as Fp8Rows where it takes them. Without a residual, x starts the
        stream: (norm(x), x)."""
        if projection is None or not projection.takes_fp8_rows(x.shape[-2], self.weight.dtype, x.device):
            if residual is None:
                return self(x), x
            return self.add_and_norm(x, residual)
        rows, summed = add_rms_norm_fp8(x, residual, self.weight, self.eps)
        return rows, x if summed is None else summed


def rope_inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_inverse_frequencies(head_dim, base, scaling)
    if scaling.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low frequencies by `factor`, and blend
        # smoothly in between, measured by wavelength against the original context.
        old_context = scaling.original_max_position_embeddings
        low_freq_wavelen = old_context / scaling.low_freq_factor
        high_freq_wavelen = old_context / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {scaling.rope_type!r}")


def _yarn_inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are
    interpolated (divided by factor), those turning more than beta_fast times kept, with a
    linear ramp over the dimensions in between."""
    position_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolated = 1.0 / position_freqs
    interpolated = 1.0 / (scaling.factor * position_freqs)

    def correction_dim(num_rotations: float) -> float:
        context = scaling.original_max_position_embeddings
        return head_dim * math.log(context / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


def _longrope_angles(
    head_dim: int, base: float, scaling: RopeScaling, positions: torch.Tensor
) -> torch.Tensor:
    """Phi-3's LongRoPE, by position: the short factors inside the original context, the
    long ones past it. Hugging Face switches all positions of a forward to the long
    factors once any passes the original context; the two agree on every sequence that
    stays inside it, and per position a token's rotation never depends on its batch."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim

    def angles(factors: tuple[float, ...]) -> torch.Tensor:
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)
        return torch.outer(positions, inv_freq.to(positions.device))

    inside = positions[:, None] < scaling.original_max_position_embeddings
    return torch.where(inside, angles(scaling.short_factor), angles(scaling.long_factor))


def _dynamic_ntk_angles(
    head_dim: int, base: float, scaling: RopeScaling, positions: torch.Tensor
) -> torch.Tensor:
    """Dynamic NTK scaling, by position: inside the original context the plain frequencies;
    past it, position p takes the base Hugging Face computes for a sequence of p + 1
    tokens. That is the rotation Hugging Face gives each token it decodes one at a time (it
    recomputes the base as the sequence grows and keeps the keys already cached), and it
    never depends on the batch; a prompt longer than the original context, prefilled in
    one forward, is rotated by Hugging Face with its last position's base instead."""
    original = scaling.original_max_position_embeddings
    lengths = torch.clamp(positions + 1, min=original)
    bases = base * ((scaling.factor * lengths / original) - (scaling.factor - 1)) ** (
        head_dim / (head_dim - 2)
    )
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return positions[:, None] / bases[:, None] ** exponents[None, :]


class RotaryEmbedding(nn.Module):
    """The cos/sin table of rotary position embedding in the rotate-half (GPT-NeoX) layout
    used by Llama/Qwen; the attention layer applies it, in one pass with the KV store."""

    cos_sin_cache: torch.Tensor

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        positions = torch.arange(max_position, dtype=torch.float32)
        if scaling is not None and scaling.rope_type == "longrope":
            freqs = _longrope_angles(head_dim, base, scaling, positions)
        elif scaling is not None and scaling.rope_type == "dynamic":
            freqs = _dynamic_ntk_angles(head_dim, base, scaling, positions)
        else:
            inv_freq = rope_inverse_frequencies(head_dim, base, scaling)
            freqs = torch.outer(positions, inv_freq.to(positions.device))
        # fp32 whatever the model dtype: bf16 cos/sin lose precision at large positions.
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()
        if scaling is not None and scaling.attention_factor != 1.0:
            cos_sin = cos_sin * scaling.attention_factor
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = new_parameter(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits; may share the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = new_parameter(vocab_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight)
