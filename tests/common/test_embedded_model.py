import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from services.common import embedded_model
from services.common.embedded_model import (
    COMPLETE_MARKER,
    default_model_dir,
    is_materialized,
    materialize_default_model,
)


@pytest.fixture(scope="module")
def hf_model(embedded_model_dir: Path) -> PreTrainedModel:
    model, loading_info = AutoModelForCausalLM.from_pretrained(
        embedded_model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert loading_info["missing_keys"] == set()
    assert loading_info["unexpected_keys"] == set()
    assert loading_info["mismatched_keys"] == set()
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(embedded_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture(scope="module")
def raw_tokenizer(embedded_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(embedded_model_dir / "tokenizer.json"))


def greedy_continuation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: int
) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


# --- model -------------------------------------------------------------------------------


def test_config_comes_from_gguf_metadata(embedded_model_dir: Path) -> None:
    config = json.loads((embedded_model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    assert {key: config[key] for key in expected} == expected
    generation = json.loads((embedded_model_dir / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2


@pytest.mark.hf
@pytest.mark.slow
def test_model_knows_a_fact(hf_model: PreTrainedModel, hf_tokenizer: PreTrainedTokenizerBase) -> None:
    continuation = greedy_continuation(hf_model, hf_tokenizer, "The capital of France is", tokens=8)
    assert "Paris" in continuation


@pytest.mark.hf
@pytest.mark.slow
def test_model_tracks_positions(hf_model: PreTrainedModel, hf_tokenizer: PreTrainedTokenizerBase) -> None:
    # Counting needs working rotary embeddings: with Q/K rows left in llama.cpp's interleaved
    # order the model still says "Paris" but degenerates into "1, 2, 2, 2, ..." here.
    continuation = greedy_continuation(
        hf_model, hf_tokenizer, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", tokens=24
    )
    assert continuation.startswith(" 13, 14, 15, 16, 17, 18")


@pytest.mark.hf
@pytest.mark.slow
def test_chat_answer(hf_model: PreTrainedModel, hf_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = hf_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = hf_tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer


def test_rotary_row_order_is_restored() -> None:
    # One head of dim 4, rows as llama.cpp stores them: pairs (x0, y0), (x1, y1).
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    restored = embedded_model._undo_rotary_row_permutation(stored, n_head=1)
    assert restored.ravel().tolist() == [0.0, 1.0, 2.0, 3.0]


# --- tokenizer ---------------------------------------------------------------------------


def test_chat_markers_are_single_special_ids(raw_tokenizer: Tokenizer) -> None:
    encoding = raw_tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert encoding.ids[0] == 1 and encoding.ids[-1] == 2
    assert raw_tokenizer.encode("<|im_start|>").ids == [1]
    assert raw_tokenizer.encode("<|im_end|>").ids == [2]
    assert raw_tokenizer.decode(encoding.ids, skip_special_tokens=True) == "user\nHi"


@pytest.mark.hf
def test_no_bos_is_added(raw_tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase) -> None:
    assert raw_tokenizer.encode("Hello world").tokens == ["Hello", "Ġworld"]
    assert hf_tokenizer("Hello world")["input_ids"] == raw_tokenizer.encode("Hello world").ids


def test_digits_are_split_one_per_token(raw_tokenizer: Tokenizer) -> None:
    assert raw_tokenizer.encode("2024").tokens == ["2", "0", "2", "4"]
    assert raw_tokenizer.encode("in 1999!").tokens[-5:] == ["1", "9", "9", "9", "!"]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces  ",
        "café naïve résumé",
        "中文文本和日本語のテキスト",
        "emoji 😀🚀👍🏽 and flags 🇫🇷",
        "tabs\tand\nnewlines\r\n",
        "def f(x):\n    return x ** 2  # 3.14159",
        "<|im_start|>system\nmixed <|im_end|> markers",
    ],
)
@pytest.mark.hf
def test_round_trip(raw_tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = raw_tokenizer.encode(text).ids
    assert raw_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == text


@pytest.mark.hf
def test_auto_tokenizer_special_tokens_and_template(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    assert hf_tokenizer.bos_token == "<|im_start|>"
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert hf_tokenizer.pad_token == "<|im_end|>"
    assert hf_tokenizer.unk_token == "<|endoftext|>"
    assert hf_tokenizer.model_max_length == 8192
    rendered = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# --- cache -------------------------------------------------------------------------------


def test_cache_root_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "pagedserve" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_model_dir() == Path.home() / ".cache" / "pagedserve" / "models" / "SmolLM2-135M-Instruct"
    assert default_model_dir(tmp_path) == tmp_path / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_materialize_reuses_complete_dir_and_redoes_incomplete(tmp_path: Path) -> None:
    model_dir = materialize_default_model(tmp_path)
    assert model_dir == default_model_dir(tmp_path)
    assert is_materialized(model_dir)
    weights = model_dir / "model.safetensors"
    first_mtime = weights.stat().st_mtime_ns

    assert materialize_default_model(tmp_path) == model_dir
    assert weights.stat().st_mtime_ns == first_mtime

    # What a crash mid-conversion would look like had the files been written in place.
    (model_dir / COMPLETE_MARKER).unlink()
    (model_dir / "config.json").write_text("{truncated")
    os.utime(weights, ns=(first_mtime - 10**9, first_mtime - 10**9))
    assert materialize_default_model(tmp_path) == model_dir
    assert is_materialized(model_dir)
    assert weights.stat().st_mtime_ns != first_mtime - 10**9
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    # No staging or discarded copies are left beside the model.
    assert [path.name for path in model_dir.parent.iterdir()] == [model_dir.name]
