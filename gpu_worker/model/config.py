"""The architecture of a model, read from a Hugging Face model directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency-dependent scaling, or plain linear position scaling."""

    rope_type: str  # "llama3" or "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    # Qwen3 normalizes each query and key head before RoPE.
    use_qk_norm: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelConfig:
        model_dir = Path(model_dir)
        with open(model_dir / "config.json") as f:
            raw = json.load(f)
        generation_path = model_dir / "generation_config.json"
        generation: dict[str, Any] = {}
        if generation_path.exists():
            with open(generation_path) as f:
                generation = json.load(f)
        return cls.from_dicts(raw, generation)

    @classmethod
    def from_dicts(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; only 'silu' is implemented")
        if raw.get("use_sliding_window", False):
            raise ValueError("sliding-window attention is not implemented")

        num_attention_heads = int(raw["num_attention_heads"])
        hidden_size = int(raw["hidden_size"])
        # A present-but-null head_dim means the default, as in transformers.
        head_dim = raw.get("head_dim") or hidden_size // num_attention_heads
        rope_theta, rope_scaling = _parse_rope(raw)
        architectures = raw.get("architectures") or []
        return cls(
            model_type=model_type,
            architecture=architectures[0] if architectures else model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=num_attention_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or num_attention_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            # LlamaConfig and Qwen3Config both default to separate output weights.
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            use_qk_norm=model_type == "qwen3",
            eos_token_ids=_collect_eos_ids(raw, generation or {}),
        )


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # Newer configs nest everything in rope_parameters; older ones use rope_theta plus
    # rope_scaling (whose type key was once called "type").
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    rope_theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not implemented")
    if rope_type == "default":
        return rope_theta, None
    if rope_type == "linear":
        return rope_theta, RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
    if rope_type == "llama3":
        return rope_theta, RopeScaling(
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope scaling {rope_type!r}; implemented: default, linear, llama3")


def _collect_eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    # Chat models often list their end-of-turn token only in generation_config.json, so
    # the union of both files is what ends a sequence.
    ids: list[int] = []
    for source in (raw, generation):
        value = source.get("eos_token_id")
        if value is None:
            continue
        for token_id in value if isinstance(value, list) else [value]:
            if int(token_id) not in ids:
                ids.append(int(token_id))
    return tuple(ids)
