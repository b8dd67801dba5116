"""Text ↔ token ids for one model directory: the `tokenizers` fast tokenizer from
tokenizer.json plus the settings of tokenizer_config.json (special tokens, BOS policy and
the chat template), read once at load."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from services.common.errors import InvalidArgumentError

ALLOWED_CHAT_ROLES = ("system", "user", "assistant", "tool")

# Keys of tokenizer_config.json that name special tokens; templates see them by these names.
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json says beyond tokenizer.json."""

    special_tokens: dict[str, str]
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None


class ChatTemplate:
    """A compiled chat template, rendered as HF transformers renders it: sandboxed (the
    template comes with the model and is untrusted), trim_blocks/lstrip_blocks, the
    `raise_exception` helper, and the special tokens in the context."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_template_error
        environment.globals["strftime_now"] = _strftime_now
        # Compiled once so that a broken template fails at startup, not per request.
        self._template = environment.from_string(source)
        self._special_tokens = dict(special_tokens)

    def render(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=[{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as error:
            # Templates reject conversations they cannot express (e.g. roles that do not
            # alternate) with raise_exception: that is the caller's input, not a fault.
            raise InvalidArgumentError(
                "messages", f"rejected by the model's chat template: {error}"
            ) from error


class TextTokenizer:
    def __init__(
        self, tokenizer: Tokenizer, settings: TokenizerSettings, extra_eos_token_ids: Sequence[int] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._settings = settings
        self._chat_template = (
            ChatTemplate(settings.chat_template, settings.special_tokens) if settings.chat_template else None
        )
        self._bos_token_id = self._special_token_id("bos_token")
        self._eos_token_id = self._special_token_id("eos_token")
        own_eos = () if self._eos_token_id is None else (self._eos_token_id,)
        self._eos_token_ids = tuple(dict.fromkeys((*own_eos, *extra_eos_token_ids)))
        self._max_token_chars = max(
            (len(token) for token in tokenizer.get_vocab(with_added_tokens=True)), default=1
        )

    @classmethod
    def from_model_dir(cls, path: Path) -> TextTokenizer:
        path = Path(path)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        settings = TokenizerSettings(
            special_tokens=_special_tokens(config),
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=_chat_template_source(path, config),
        )
        # Instruct models often end a turn with a token other than the tokenizer's EOS;
        # the model and generation configs list those.
        extra_eos: list[int] = []
        for file_name in ("config.json", "generation_config.json"):
            extra_eos.extend(_token_id_list(_read_json(path / file_name).get("eos_token_id")))
        return cls(tokenizer, settings, extra_eos)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included; the model's embedding may have
        more rows (padding), which decode to nothing."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token stands for: its longest entry. Byte-level
        vocabularies spell each byte with one character, so this bounds bytes too. A text
        longer than max_model_len times this cannot fit a sequence, whatever it says."""
        return self._max_token_chars

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The tokenizer's EOS first, then those that config.json and
        generation_config.json add."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def encode(self, text: str) -> list[int]:
        """Special tokens written in the text become their ids. BOS/EOS are added only when
        tokenizer_config.json asks for it, and BOS not twice when the text already starts
        with it (chat templates usually write it)."""
        # add_special_tokens=False skips tokenizer.json's post-processor: the BOS policy is
        # tokenizer_config.json's alone, as HF's fast tokenizers apply it.
        # encode_batch lets go of the interpreter lock while it works (encode holds it: a
        # long text would stall the event loop and every stream on it for its duration).
        ids = self._tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        if (
            self._settings.add_bos_token
            and self._bos_token_id is not None
            and ids[:1] != [self._bos_token_id]
        ):
            ids.insert(0, self._bos_token_id)
        if self._settings.add_eos_token and self._eos_token_id is not None:
            ids.append(self._eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it. Raises
        InvalidArgumentError for a role outside ALLOWED_CHAT_ROLES, when the model has no
        template, or when the template itself rejects the conversation."""
        for index, (role, _) in enumerate(messages):
            if role not in ALLOWED_CHAT_ROLES:
                raise InvalidArgumentError(
                    f"messages[{index}].role", f"must be one of {', '.join(ALLOWED_CHAT_ROLES)}; got {role!r}"
                )
        if self._chat_template is None:
            raise InvalidArgumentError("messages", "this model has no chat template; send a prompt instead")
        return self._chat_template.render(messages, add_generation_prompt)

    def _special_token_id(self, key: str) -> int | None:
        content = self._settings.special_tokens.get(key)
        return None if content is None else self._tokenizer.token_to_id(content)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    content: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return content


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        # Saved either as the plain string or as a serialized AddedToken.
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    # Newer HF directories keep the template in its own file instead.
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    # Some models ship several named templates; the default one is for plain chat.
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _token_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int)]
    return []
