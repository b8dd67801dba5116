"""Builds a model and fills it from the *.safetensors files of a Hugging Face directory."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from gpu_worker.config import LOAD_FORMATS
from gpu_worker.model import model_class_for
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.decoder import DecoderForCausalLM
from gpu_worker.model.quantization.methods import process_quantized_weights
from gpu_worker.model.quantization.support import check_quantization_supported
from gpu_worker.parallel.groups import SINGLE_RANK_CONTEXT, ParallelContext

# Checkpoint module name -> (fused module name, shard id) for projections the engine fuses.
STACKED_PARAMS: dict[str, tuple[str, str]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}

# Checkpoint tensors that are derived state, recomputed by the engine.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    model_dir: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_position: int,
    parallel: ParallelContext = SINGLE_RANK_CONTEXT,
    load_format: str = "safetensors",
) -> DecoderForCausalLM:
    """Builds the model directly on `device` in `dtype` and loads every weight into it; under
    tensor or pipeline parallelism only this rank's shard of this rank's stage.

    load_format "dummy" reads no weight file: every parameter is drawn at random on the
    device, with the architecture's shapes (for benchmarks of models not at hand)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unsupported load_format {load_format!r}; supported: {', '.join(LOAD_FORMATS)}")
    model_class = model_class_for(config)
    check_quantization_supported(config.quantization, config, device, parallel.config)
    with _default_dtype(dtype), torch.device(device):
        model = model_class(config, max_position, parallel)
    if load_format == "dummy":
        fill_dummy_weights(model)
    else:
        load_weights(model, iter_safetensors(Path(model_dir)))
    process_quantized_weights(model)
    return model.eval()


def fill_dummy_weights(model: nn.Module, seed: int = 0, bound: float = 1e-3) -> None:
    """Uniform in [-bound, bound]: small enough that activations stay finite through any
    depth; norm weights too, which keeps every layer's arithmetic that of real weights.
    Integer (packed 4-bit) tensors get random bits, or what their dummy_fill says."""
    generator: torch.Generator | None = None
    with torch.no_grad():
        for param in model.parameters():
            if generator is None:
                generator = torch.Generator(device=param.device).manual_seed(seed)
            if hasattr(param, "dummy_fill"):
                param.dummy_fill(param)
            elif param.dtype.is_floating_point:
                param.uniform_(-bound, bound, generator=generator)
            else:
                param.random_(generator=generator)


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint: the files that model.safetensors.index.json names
    when there is one (Mistral's directories also hold consolidated.safetensors, the same
    weights under other names), else every *.safetensors file."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safetensors handles are not iterable)
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Routes each checkpoint tensor to its parameter's weight_loader, then checks that every
    parameter (and every shard of a fused one) was filled exactly once. Tensors that another
    pipeline stage holds (the model's stage_checkpoint_name says None) are skipped."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    # Buffers a checkpoint may fill too (an fp8 cache's scales), which are no weights.
    params.update((name, b) for name, b in model.named_buffers() if hasattr(b, "weight_loader"))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    stage_name = getattr(model, "stage_checkpoint_name", None)
    split = getattr(model, "split_checkpoint_tensor", None)
    if split is not None:
        weights = (part for name, tensor in weights for part in split(name, tensor))
    loaded: dict[str, set[str | None]] = {name: set() for name in params}
    for checkpoint_name, tensor in weights:
        if checkpoint_name.endswith(_IGNORED_SUFFIXES):
            continue
        if tied and checkpoint_name == "lm_head.weight":
            # Some tied checkpoints still store a copy of the embedding.
            continue
        name = stage_name(checkpoint_name) if stage_name is not None else checkpoint_name
        if name is None:
            continue
        param_name, shard_id = _map_name(name)
        if param_name not in params:
            raise KeyError(f"checkpoint tensor {checkpoint_name!r} has no parameter in the model")
        if shard_id in loaded[param_name]:
            raise ValueError(f"checkpoint tensor {checkpoint_name!r} appears twice")
        param = params[param_name]
        with torch.no_grad():
            if shard_id is None:
                param.weight_loader(param, tensor)  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field
            else:
                param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]  # a loader hook, not an nn.Parameter field
        loaded[param_name].add(shard_id)

    missing: list[str] = []
    for name, param in params.items():
        if getattr(param, "optional", False):
            continue
        expected = set(getattr(param, "shard_ids", (None,)))
        missing.extend(f"{name}[{shard}]" if shard else name for shard in expected - loaded[name])
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing))}")


# An fp8 KV cache's calibrated scales (gpu_worker/model/attention.py).
_KV_SCALES = ("self_attn.k_scale", "self_attn.v_scale")
# One expert's projection: loads into its rows of the layer's stacked expert weights.
_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight(_scale_inv)?$")


def _map_name(checkpoint_name: str) -> tuple[str, str | None]:
    if checkpoint_name.endswith(_KV_SCALES):
        # The attention layer that keeps them sits below the checkpoint's self_attn.
        prefix, _, scale = checkpoint_name.rpartition(".")
        return f"{prefix}.attn.{scale}", None
    expert = _EXPERT_TENSOR.match(checkpoint_name)
    if expert is not None:
        prefix, index, part, scales = expert.groups()
        fused = "down_proj" if part == "down" else "gate_up_proj"
        return f"{prefix}.{fused}{scales or ''}", f"{index}.{part}"
    parts = checkpoint_name.split(".")
    for index, part in enumerate(parts):
        if part in STACKED_PARAMS:
            fused_name, shard_id = STACKED_PARAMS[part]
            parts[index] = fused_name
            return ".".join(parts), shard_id
    return checkpoint_name, None


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
