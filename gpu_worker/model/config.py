"""The architecture of a model, read from a Hugging Face model directory."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_worker.model.quantization.config import QuantizationConfig, parse_checkpoint_quantization

# The architectures gpu_worker.model.MODEL_CLASSES builds; a test keeps the two in step.
SUPPORTED_MODEL_TYPES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "gemma2",
    "gemma3_text",
    "mixtral",
    "qwen3_moe",
)
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# Architectures whose configs default to tied input and output embeddings.
_TIED_BY_DEFAULT = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency-dependent scaling, YaRN, or plain linear position scaling."""

    rope_type: str  # "llama3", "yarn", "longrope", "dynamic" or "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # YaRN: cos and sin are multiplied by attention_factor; frequencies between the
    # beta_fast and beta_slow rotation counts blend interpolation and extrapolation.
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    # LongRoPE (Phi-3): per-frequency divisors for positions inside the original context
    # and for positions past it; cos and sin are multiplied by attention_factor.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


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
    # Qwen2 biases q/k/v but not o_proj; Llama's attention_bias biases all four.
    qkv_bias: bool = False
    hidden_act: str = "silu"
    # Per decoder layer: how many most recent positions (its own included) a query attends
    # to, or None for the whole context. Empty means None for every layer.
    sliding_windows: tuple[int | None, ...] = ()
    # Gemma: scores and final logits pass through cap * tanh(x / cap).
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Scores are scaled by this ** -0.5; None means head_dim.
    query_pre_attn_scalar: float | None = None
    # Gemma 3: the sliding-window layers' own RoPE base and scaling.
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling | None = None

    # Mixture of experts: per decoder layer, whether its MLP is the routed experts (empty:
    # none is); each token goes to num_experts_per_tok of num_experts experts of
    # moe_intermediate_size, weighted by the router's softmax over them, renormalized over
    # the chosen ones when norm_topk_prob.
    moe_layers: tuple[bool, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # How the linear layers' weights are quantized (the checkpoint's quantization_config,
    # or --quantization once the worker resolves it); None: not at all.
    quantization: QuantizationConfig | None = None

    def is_moe_layer(self, layer_index: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer_index]

    def sliding_window(self, layer_index: int) -> int | None:
        return self.sliding_windows[layer_index] if self.sliding_windows else None

    @property
    def window_of_every_layer(self) -> int | None:
        """The largest window when every layer attends within one; None when some layer
        sees the whole context."""
        if not self.sliding_windows or None in self.sliding_windows:
            return None
        return max(w for w in self.sliding_windows if w is not None)

    @property
    def longest_context(self) -> int:
        """Positions the model is made for: max_position_embeddings, stretched by dynamic
        NTK scaling's factor, which extends a model past its trained context at run time
        (the other scalings already count their stretch in max_position_embeddings)."""
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "dynamic":
            return int(self.max_position_embeddings * self.rope_scaling.factor)
        return self.max_position_embeddings

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

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
        hidden_act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {hidden_act!r}; implemented: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )

        num_attention_heads = int(raw["num_attention_heads"])
        hidden_size = int(raw["hidden_size"])
        # A present-but-null head_dim means the default, as in transformers.
        head_dim = raw.get("head_dim") or hidden_size // num_attention_heads
        rope_theta, rope_scaling, local_rope = _parse_rope(raw)
        attention_bias = bool(raw.get("attention_bias") or False)
        num_layers = int(raw["num_hidden_layers"])
        architectures = raw.get("architectures") or []
        return cls(
            model_type=model_type,
            architecture=architectures[0] if architectures else model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=num_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or num_attention_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
            attention_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            use_qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
            eos_token_ids=_collect_eos_ids(raw, generation or {}),
            qkv_bias=attention_bias or model_type == "qwen2",
            hidden_act=hidden_act,
            sliding_windows=_sliding_windows(raw, num_layers),
            attn_logit_softcapping=_optional_float(raw.get("attn_logit_softcapping")),
            final_logit_softcapping=_optional_float(raw.get("final_logit_softcapping")),
            query_pre_attn_scalar=_optional_float(raw.get("query_pre_attn_scalar")),
            local_rope_theta=local_rope[0] if local_rope else None,
            local_rope_scaling=local_rope[1] if local_rope else None,
            quantization=parse_checkpoint_quantization(raw.get("quantization_config")),
            **_moe_fields(raw, model_type, num_layers),
        )


def _moe_fields(raw: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    num_experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
    if model_type not in ("mixtral", "qwen3_moe") or num_experts == 0:
        return {}
    top_k = int(raw["num_experts_per_tok"])
    if not 0 < top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok {top_k} must be in [1, num_experts {num_experts}]")
    if model_type == "mixtral":
        return dict(
            moe_layers=(True,) * num_layers,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=int(raw["intermediate_size"]),
            norm_topk_prob=True,
        )
    # Qwen3-MoE: every decoder_sparse_step-th layer routes, except the listed dense ones.
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = set(raw.get("mlp_only_layers") or [])
    return dict(
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _sliding_windows(raw: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Which layers attend within a window: `layer_types` where the config lists them
    (Gemma, Qwen2), else every layer when `sliding_window` is set (Mistral, Phi-3)."""
    window = raw.get("sliding_window")
    if window is None or raw.get("use_sliding_window") is False:
        return ()
    layer_types = raw.get("layer_types")
    # Older Gemma configs give a period instead: every period-th layer is global.
    period = {"gemma2": 2, "gemma3_text": raw.get("sliding_window_pattern", 6)}.get(raw["model_type"])
    if layer_types is None and period is not None:
        layer_types = [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_layers)
        ]
    if layer_types is None:
        return (int(window),) * num_layers
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types lists {len(layer_types)} layers; num_hidden_layers is {num_layers}")
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"unsupported layer_types {sorted(unknown)}")
    windows = tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types)
    return windows if any(w is not None for w in windows) else ()


Rope = tuple[float, RopeScaling | None]


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None, Rope | None]:
    """(rope_theta, scaling, the local layers' own (theta, scaling) or None)."""
    params = raw.get("rope_parameters") or {}
    if "full_attention" in params:
        # Gemma 3 in newer configs: one set of parameters per layer type.
        global_rope = _parse_rope_params(params["full_attention"], params["full_attention"])
        local = params.get("sliding_attention")
        return (*global_rope, _parse_rope_params(local, local) if local else None)
    theta, scaling = _parse_rope_params(raw, params)
    local_theta = raw.get("rope_local_base_freq")
    return theta, scaling, (float(local_theta), None) if local_theta is not None else None


def _parse_rope_params(raw: dict[str, Any], params: dict[str, Any]) -> Rope:
    # Newer configs nest everything in rope_parameters; older ones use rope_theta plus
    # rope_scaling (whose type key was once called "type").
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
    if rope_type == "yarn":
        return rope_theta, _yarn_scaling(raw, scaling)
    if rope_type == "longrope":
        return rope_theta, _longrope_scaling(raw, scaling)
    if rope_type == "dynamic":
        # Hugging Face measures the growth against max_position_embeddings itself.
        return rope_theta, RopeScaling(
            rope_type="dynamic",
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(raw["max_position_embeddings"]),
        )
    raise ValueError(
        f"unsupported rope scaling {rope_type!r}; implemented: default, linear, llama3, yarn, longrope, dynamic"
    )


def _longrope_scaling(raw: dict[str, Any], scaling: dict[str, Any]) -> RopeScaling:
    original = int(scaling.get("original_max_position_embeddings") or raw["original_max_position_embeddings"])
    factor = scaling.get("factor") or int(raw["max_position_embeddings"]) / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        rope_type="longrope",
        factor=float(factor),
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
        short_factor=tuple(float(f) for f in scaling["short_factor"]),
        long_factor=tuple(float(f) for f in scaling["long_factor"]),
    )


def _yarn_scaling(raw: dict[str, Any], scaling: dict[str, Any]) -> RopeScaling:
    original = int(scaling.get("original_max_position_embeddings") or raw["max_position_embeddings"])
    factor = scaling.get("factor") or int(raw["max_position_embeddings"]) / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return RopeScaling(
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=original,
        attention_factor=float(attention_factor),
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        truncate=bool(scaling.get("truncate", True)),
    )


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


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
