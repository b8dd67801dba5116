import json
from pathlib import Path

import pytest

from services.common.errors import InvalidArgumentError
from services.tokenizer.tokenizer import ALLOWED_CHAT_ROLES, TextTokenizer
from tests.support.small_tokenizer import SPECIAL_TOKENS, build_tokenizer, write_model_dir

CONVERSATION = [
    ("system", "Be brief."),
    ("user", "Grüße, 日本語 🙂?"),
    ("assistant", "Hallo!"),
    ("user", "More"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("small_model"))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_model_dir(model_dir)


def tokenizer_with_config(tmp_path: Path, **changes: object) -> TextTokenizer:
    """The small model with tokenizer_config.json keys replaced (None removes a key)."""
    model_dir = write_model_dir(tmp_path)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_path.write_text(json.dumps(config))
    return TextTokenizer.from_model_dir(model_dir)


def test_model_facts(tokenizer: TextTokenizer) -> None:
    reference = build_tokenizer()
    assert tokenizer.vocab_size == reference.get_vocab_size() == 420
    assert tokenizer.eos_token_id == reference.token_to_id("<|im_end|>")
    # config.json adds <|endoftext|> as a second end of sequence, after the tokenizer's.
    assert tokenizer.eos_token_ids == (
        reference.token_to_id("<|im_end|>"),
        reference.token_to_id("<|endoftext|>"),
    )
    assert tokenizer.bos_token_id == reference.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("text", ["Hello world", "Grüße, 日本語 🙂 👍🏽 ∑", " leading and trailing ", ""])
def test_encode_decode_round_trip(tokenizer: TextTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_special_tokens_in_text_become_single_ids_without_extra_bos(tokenizer: TextTokenizer) -> None:
    im_start, im_end = (build_tokenizer().token_to_id(token) for token in ("<|im_start|>", "<|im_end|>"))
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert ids.count(im_start) == 1 and ids.count(im_end) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.decode(ids) == "user\nhi"


def test_add_bos_token_prepends_bos_once(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    with_bos = tokenizer_with_config(tmp_path, add_bos_token=True)
    bos = with_bos.bos_token_id
    assert with_bos.encode("hi") == [bos, *tokenizer.encode("hi")]
    assert with_bos.encode("<|endoftext|>hi") == [bos, *tokenizer.encode("hi")]


def test_render_chat_chatml(tokenizer: TextTokenizer) -> None:
    expected = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in CONVERSATION)
    assert tokenizer.render_chat(CONVERSATION) == expected + "<|im_start|>assistant\n"
    assert tokenizer.render_chat(CONVERSATION, add_generation_prompt=False) == expected


@pytest.mark.hf
def test_render_chat_matches_hf_transformers(model_dir: Path, tokenizer: TextTokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    messages = [{"role": role, "content": content} for role, content in CONVERSATION]
    for add_generation_prompt in (True, False):
        expected = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert tokenizer.render_chat(CONVERSATION, add_generation_prompt) == expected
    rendered = tokenizer.render_chat(CONVERSATION)
    assert tokenizer.encode(rendered) == hf_tokenizer.encode(rendered, add_special_tokens=False)


def test_unknown_role_names_the_message_and_the_allowed_roles(tokenizer: TextTokenizer) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        tokenizer.render_chat([("user", "hi"), ("robot", "beep")])
    assert caught.value.field == "messages[1].role"
    assert all(role in str(caught.value) for role in ALLOWED_CHAT_ROLES)
    assert "'robot'" in str(caught.value)


def test_missing_chat_template_is_an_error_on_messages(tmp_path: Path) -> None:
    tokenizer = TextTokenizer.from_model_dir(write_model_dir(tmp_path, chat_template=None))
    assert not tokenizer.has_chat_template
    with pytest.raises(InvalidArgumentError) as caught:
        tokenizer.render_chat([("user", "hi")])
    assert caught.value.field == "messages"


def test_template_raise_exception_is_an_invalid_argument(tokenizer: TextTokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot start with a tool result") as caught:
        tokenizer.render_chat([("tool", "42")])
    assert caught.value.field == "messages"


def test_template_sees_special_tokens_and_trims_blocks_like_hf(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}\n"
        "{% for message in messages %}\n"
        "    {% if message.role == 'user' %}\n"
        "[{{ message.content }}]{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{{ messages | tojson }}"
    )
    tokenizer = tokenizer_with_config(tmp_path, chat_template=template)
    rendered = tokenizer.render_chat([("user", "ü"), ("assistant", "x")])
    messages_json = '[{"role": "user", "content": "ü"}, {"role": "assistant", "content": "x"}]'
    assert rendered == "<|endoftext|>\n[ü]<|im_end|>\n" + messages_json


def test_template_runs_sandboxed(tmp_path: Path) -> None:
    tokenizer = tokenizer_with_config(
        tmp_path, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}"
    )
    with pytest.raises(InvalidArgumentError) as caught:
        tokenizer.render_chat([("user", "hi")])
    assert caught.value.field == "messages"


def test_template_from_separate_file_and_named_list(tmp_path: Path) -> None:
    first = write_model_dir(tmp_path / "file", chat_template=None)
    (first / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.content }}>{% endfor %}")
    assert TextTokenizer.from_model_dir(first).render_chat([("user", "a")]) == "<a>"

    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    assert (
        tokenizer_with_config(tmp_path / "named", chat_template=named).render_chat([("user", "a")]) == "plain"
    )


def test_special_tokens_of_the_fixture_are_special(tokenizer: TextTokenizer) -> None:
    for token in SPECIAL_TOKENS:
        assert tokenizer.decode(tokenizer.encode(token)) == ""


@pytest.mark.hf
def test_embedded_model_if_available(request: pytest.FixtureRequest) -> None:
    try:
        model_dir = request.getfixturevalue("embedded_model_dir")
    except Exception as error:
        pytest.skip(f"embedded model not available: {error}")
    transformers = pytest.importorskip("transformers")
    tokenizer = TextTokenizer.from_model_dir(model_dir)
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    messages = [{"role": role, "content": content} for role, content in CONVERSATION]
    rendered = tokenizer.render_chat(CONVERSATION)
    assert rendered == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode(rendered) == hf_tokenizer.encode(rendered, add_special_tokens=False)
    assert tokenizer.eos_token_id in tokenizer.eos_token_ids
