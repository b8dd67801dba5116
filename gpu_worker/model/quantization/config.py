"""Which quantization a worker serves with: from --quantization, from the checkpoint's
`quantization_config`, or both (they must agree). Torch-free, so that the command line
and ModelConfig can read it.

int8 and fp8 (W8A8) quantize a bf16/fp32 checkpoint at load time: per-output-channel
weight scales, per-token activation scales computed on the fly. fp8 also reads
checkpoints already quantized so, as llm-compressor writes them (compressed-tensors,
"float-quantized": fp8 weights with per-channel or per-tensor scales, dynamic per-token
activations). awq and gptq read 4-bit weight-only checkpoints as AutoAWQ (GEMM version)
and auto-gptq/gptqmodel (format "gptq") write them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Quantized at load time from an unquantized checkpoint.
LOAD_TIME_METHODS = ("int8", "fp8")
# Read from checkpoints quantized ahead of time.
CHECKPOINT_METHODS = ("awq", "gptq")
QUANTIZATION_METHODS = LOAD_TIME_METHODS + CHECKPOINT_METHODS
# Group size a 4-bit method assumes without a checkpoint (random weights, --load-format dummy).
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantizationConfig:
    method: str
    bits: int = 8
    # Input features that share a scale and zero point; -1: the whole input row.
    group_size: int = -1
    # GPTQ act_order: input features quantized in an order of their own, so each one's
    # group comes from g_idx rather than its position.
    desc_act: bool = False
    # fp8 weights read from the checkpoint with their scales, rather than quantized at load;
    # with weight_block, HF's fine-grained format: one scale per (rows, columns) block.
    prequantized: bool = False
    weight_block: tuple[int, int] | None = None

    @property
    def weight_only(self) -> bool:
        return self.method in CHECKPOINT_METHODS


def parse_checkpoint_quantization(raw: dict[str, Any] | None) -> QuantizationConfig | None:
    """The config.json `quantization_config`, or None for an unquantized checkpoint."""
    if not raw:
        return None
    method = str(raw.get("quant_method", "unknown")).lower()
    if method == "compressed-tensors":
        return _parse_compressed_tensors(raw)
    if method == "fp8":
        return _parse_fine_grained_fp8(raw)
    if method not in CHECKPOINT_METHODS:
        raise ValueError(
            f"unsupported quantization_config (quant_method {method!r}); "
            f"checkpoints quantized with {', '.join(CHECKPOINT_METHODS)} are supported"
        )
    bits = int(raw.get("bits", raw.get("w_bit", 0)))
    if bits != 4:
        raise ValueError(f"quantization_config.bits: only 4-bit {method} is supported, got {bits}")
    group_size = int(raw.get("group_size", raw.get("q_group_size", -1)))
    if group_size == 0 or group_size < -1:
        raise ValueError(f"quantization_config.group_size must be positive or -1, got {group_size}")
    if method == "awq":
        _check_awq(raw)
        return QuantizationConfig("awq", bits, group_size)
    checkpoint_format = str(raw.get("checkpoint_format", "gptq")).lower()
    if checkpoint_format != "gptq":
        raise ValueError(
            f"quantization_config.checkpoint_format {checkpoint_format!r} is not supported; "
            "GPTQ checkpoints must use the 'gptq' format"
        )
    return QuantizationConfig("gptq", bits, group_size, desc_act=bool(raw.get("desc_act", False)))


def _parse_compressed_tensors(raw: dict[str, Any]) -> QuantizationConfig:
    """fp8 W8A8 as llm-compressor writes it: one config group over the Linear layers,
    8-bit float weights with channel or tensor scales, dynamic per-token 8-bit float
    activations, nothing but lm_head left unquantized."""
    prefix = "quantization_config"
    if raw.get("format") != "float-quantized":
        raise ValueError(
            f"{prefix}.format {raw.get('format')!r}: of compressed-tensors, only fp8 "
            "'float-quantized' checkpoints are supported"
        )
    groups = list((raw.get("config_groups") or {}).values())
    if len(groups) != 1 or "Linear" not in groups[0].get("targets", []):
        raise ValueError(f"{prefix}.config_groups: exactly one group, targeting Linear, is supported")
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    if (
        weights.get("num_bits") != 8
        or weights.get("type") != "float"
        or weights.get("strategy") not in ("channel", "tensor")
        or weights.get("dynamic")
    ):
        raise ValueError(
            f"{prefix}: weights must be 8-bit float with static channel or tensor scales, got {weights}"
        )
    dynamic_per_token = (8, "float", True, "token")
    if tuple(inputs.get(key) for key in ("num_bits", "type", "dynamic", "strategy")) != dynamic_per_token:
        raise ValueError(f"{prefix}: input activations must be 8-bit float, dynamic, per token; got {inputs}")
    if set(raw.get("ignore") or []) - {"lm_head"}:
        raise ValueError(f"{prefix}.ignore: only lm_head may stay unquantized, got {raw.get('ignore')}")
    return QuantizationConfig("fp8", bits=8, prequantized=True)


def _parse_fine_grained_fp8(raw: dict[str, Any]) -> QuantizationConfig:
    """HF's fine-grained fp8: block-wise weight scales, dynamic activations."""
    block = raw.get("weight_block_size")
    if not isinstance(block, list) or len(block) != 2 or min(block) < 1:
        raise ValueError(
            f"quantization_config.weight_block_size must be [rows, columns], got {block!r} "
            "(fp8 checkpoints without blocks are read in the compressed-tensors format)"
        )
    if raw.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(
            f"quantization_config.activation_scheme {raw['activation_scheme']!r}: only 'dynamic' is supported"
        )
    if set(raw.get("modules_to_not_convert") or []) - {"lm_head"}:
        raise ValueError(
            "quantization_config.modules_to_not_convert: only lm_head may stay unquantized, "
            f"got {raw['modules_to_not_convert']}"
        )
    return QuantizationConfig("fp8", bits=8, prequantized=True, weight_block=(int(block[0]), int(block[1])))


def _check_awq(raw: dict[str, Any]) -> None:
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version {version!r}: only AWQ's 'gemm' packing is supported")
    if raw.get("zero_point") is False:
        raise ValueError("quantization_config.zero_point false: only AWQ with zero points is supported")
    if raw.get("modules_to_not_convert"):
        raise ValueError("quantization_config.modules_to_not_convert is not supported")


def resolve_quantization(
    requested: str | None, checkpoint: QuantizationConfig | None, load_format: str = "safetensors"
) -> QuantizationConfig | None:
    """The quantization to serve with: the checkpoint's unless --quantization asks for
    another, which is refused when the two disagree."""
    if requested is None:
        return checkpoint
    if requested not in QUANTIZATION_METHODS:
        raise ValueError(
            f"--quantization {requested!r} is not supported; choose one of {', '.join(QUANTIZATION_METHODS)}"
        )
    if checkpoint is not None:
        if checkpoint.method != requested:
            raise ValueError(
                f"--quantization {requested} conflicts with the checkpoint's "
                f"quantization_config (quant_method {checkpoint.method!r})"
            )
        return checkpoint
    if requested in CHECKPOINT_METHODS:
        if load_format != "dummy":
            raise ValueError(
                f"--quantization {requested} needs a checkpoint quantized with {requested} "
                "(its config.json has no quantization_config), or --load-format dummy"
            )
        return QuantizationConfig(requested, bits=4, group_size=DEFAULT_GROUP_SIZE)
    return QuantizationConfig(requested)
