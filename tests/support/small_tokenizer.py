"""A tiny byte-level BPE model directory for tokenizer-service tests, built in seconds
with no model download. All 256 bytes are base tokens, so id sequences can split a
multi-byte character anywhere, as a real byte-level vocabulary does."""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' and loop.first %}"
    "{{ raise_exception('a conversation cannot start with a tool result') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TRAINING_TEXT = [
    "Hello world, this is a small tokenizer for tests.",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé têxt wíth äccents, naïve café, Straße, smörgåsbord.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 🙂 👍🏽 🚀 🇫🇷 and math ∑ ∫ ≠ ≤ ≥.",
    "Numbers 0123456789 and symbols !@#$%^&*()[]{}<>.",
]


def byte_token_id(tokenizer: Tokenizer, byte: int) -> int:
    """The id of the base token for one raw byte (GPT-2's printable byte mapping)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if byte in printable:
        symbol = chr(byte)
    else:
        symbol = chr(256 + sorted(set(range(256)) - set(printable)).index(byte))
    token_id = tokenizer.token_to_id(symbol)
    assert token_id is not None, f"no base token for byte {byte:#x}"
    return token_id


def build_tokenizer(vocab_size: int = 420) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    return tokenizer


def write_model_dir(
    path: Path,
    *,
    chat_template: str | None = CHATML_TEMPLATE,
    add_bos_token: bool = False,
    bos_token: str = "<|endoftext|>",
    eos_token: str = "<|im_end|>",
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(path / "tokenizer.json"))
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos_token,
        "bos_token": bos_token,
        # The serialized-AddedToken form, which HF also writes.
        "eos_token": {
            "__type": "AddedToken",
            "content": eos_token,
            "special": True,
            "lstrip": False,
            "rstrip": False,
        },
        "unk_token": "<|endoftext|>",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    model_config = {
        "model_type": "llama",
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": 64,
    }
    model_config["eos_token_id"] = [tokenizer.token_to_id(eos_token), tokenizer.token_to_id("<|endoftext|>")]
    (path / "config.json").write_text(json.dumps(model_config), encoding="utf-8")
    return path
