from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.tokenizer.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.tokenizer.tokenizer import TextTokenizer
from tests.support.small_tokenizer import build_tokenizer, byte_token_id, write_model_dir

_TOKENIZER = build_tokenizer()
_VOCAB_SIZE = _TOKENIZER.get_vocab_size()
# Ids that make multi-byte trouble likely: lone lead and continuation bytes, and learned
# tokens that hold part of a character.
_MULTIBYTE_IDS = sorted(
    {byte_token_id(_TOKENIZER, byte) for byte in range(0x80, 0x100)}
    | {token_id for token, token_id in _TOKENIZER.get_vocab().items() if any(ord(c) >= 0x80 for c in token)}
)
_SPECIAL_IDS = [_TOKENIZER.token_to_id(token) for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]

token_ids = st.lists(
    st.one_of(
        st.integers(0, _VOCAB_SIZE - 1), st.sampled_from(_MULTIBYTE_IDS), st.sampled_from(_SPECIAL_IDS)
    ),
    max_size=40,
)
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return TextTokenizer.from_model_dir(write_model_dir(tmp_path_factory.mktemp("small_model")))


def split_into_chunks(ids: Sequence[int], data: st.DataObject) -> list[list[int]]:
    chunks, start = [], 0
    while start < len(ids):
        size = data.draw(st.integers(1, 5), label="chunk size")
        chunks.append(list(ids[start : start + size]))
        start += size
    return chunks


def stream(detokenizer: IncrementalDetokenizer, chunks: Sequence[Sequence[int]]) -> list[str]:
    deltas = [detokenizer.add(chunk) for chunk in chunks]
    deltas.append(detokenizer.flush())
    return deltas


@fast
@given(ids=token_ids, skip_special_tokens=st.booleans(), data=st.data())
def test_deltas_add_up_to_full_decode_for_any_ids_and_chunking(
    tokenizer: TextTokenizer, ids: list[int], skip_special_tokens: bool, data: st.DataObject
) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = stream(detokenizer, split_into_chunks(ids, data))
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@fast
@given(text=st.text(max_size=30), data=st.data())
def test_valid_text_streams_back_without_replacement_characters(
    tokenizer: TextTokenizer, text: str, data: st.DataObject
) -> None:
    ids = tokenizer.encode(text)
    deltas = stream(
        IncrementalDetokenizer(tokenizer, skip_special_tokens=False), split_into_chunks(ids, data)
    )
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=False)
    # Every delta is whole characters: no U+FFFD unless the text itself had one.
    if "\ufffd" not in text:
        assert all("\ufffd" not in delta for delta in deltas)


def test_character_split_over_byte_tokens_is_held_until_complete(tokenizer: TextTokenizer) -> None:
    emoji_bytes = [byte_token_id(_TOKENIZER, byte) for byte in "🙂".encode()]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add([token_id]) for token_id in emoji_bytes] == ["", "", "", "🙂"]
    assert detokenizer.add(tokenizer.encode("a")) == "a"
    assert detokenizer.flush() == ""


def test_learned_tokens_that_straddle_characters(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("日本語")
    # The fixture's vocabulary splits these characters across token boundaries.
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.add([token_id]) for token_id in ids) == "日本語"


def test_unfinished_character_at_the_end_is_flushed_as_decode_writes_it(tokenizer: TextTokenizer) -> None:
    unfinished = [byte_token_id(_TOKENIZER, 0xE4), byte_token_id(_TOKENIZER, 0xB8)]
    ids = tokenizer.encode("ok ") + unfinished
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add(ids[: -len(unfinished)]) == "ok "
    assert [detokenizer.add([token_id]) for token_id in unfinished] == ["", ""]
    assert detokenizer.flush() == tokenizer.decode(ids)[len("ok ") :]


def test_special_tokens_skipped_or_kept(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("hi<|im_end|>")
    assert "".join(stream(IncrementalDetokenizer(tokenizer), [ids])) == "hi"
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(stream(kept, [ids])) == "hi<|im_end|>"


class DecodeRecorder:
    """Records how many ids each decode call gets."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self.call_sizes: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.call_sizes.append(len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("Hello world, 日本語 and 🙂! ", id="text"),
        # Each lone continuation byte decodes to U+FFFD, so the text always ends in one.
        pytest.param(None, id="invalid-bytes"),
    ],
)
def test_work_per_token_stays_bounded_over_long_outputs(
    tokenizer: TextTokenizer, pattern: str | None
) -> None:
    if pattern is None:
        ids = [byte_token_id(_TOKENIZER, 0x80)] * 3000
    else:
        ids = (tokenizer.encode(pattern) * 400)[:3000]
    recorder = DecodeRecorder(tokenizer)
    detokenizer = IncrementalDetokenizer(recorder)
    text = "".join(detokenizer.add([token_id]) for token_id in ids) + detokenizer.flush()
    assert text == tokenizer.decode(ids)
    assert max(recorder.call_sizes) <= 16
    assert sum(recorder.call_sizes) <= 30 * len(ids)


# Stop strings


def test_stop_string_cuts_the_text_and_ends_the_stream(tokenizer: TextTokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["world"])
    emitted = "".join(detokenizer.add([token_id]) for token_id in tokenizer.encode("Hello world, and more"))
    assert emitted == "Hello "
    assert detokenizer.stopped
    assert detokenizer.add(tokenizer.encode("anything")) == ""
    assert detokenizer.flush() == ""


def test_possible_stop_start_is_held_back_then_released() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("a </e") == "a "
    assert matcher.feed("x") == "</ex"
    assert matcher.feed("</") == ""
    assert matcher.flush() == "</"
    assert not matcher.stopped


def test_held_back_text_is_flushed_when_generation_ends(tokenizer: TextTokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["Hello there"])
    assert detokenizer.add(tokenizer.encode("Say Hello")) == "Say "
    assert detokenizer.flush() == "Hello"
    assert not detokenizer.stopped


def test_stop_string_found_in_flushed_text(tokenizer: TextTokenizer) -> None:
    # The stop string ends with half a character, held by the decoder until flush.
    stop = "ab" + bytes([0xE4]).decode("utf-8", errors="replace")
    detokenizer = IncrementalDetokenizer(tokenizer, stop=[stop])
    assert detokenizer.add(tokenizer.encode("x ab")) == "x "
    assert detokenizer.add([byte_token_id(_TOKENIZER, 0xE4)]) == ""
    assert detokenizer.flush() == ""
    assert detokenizer.stopped


def test_first_stop_string_to_complete_wins() -> None:
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("xabcd") == "xa"
    assert matcher.stopped


def _expected_text_before_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [(text.index(stop) + len(stop), text.index(stop)) for stop in stops if stop in text]
    return (text[: min(hits)[1]], True) if hits else (text, False)


stop_alphabet = st.sampled_from(["a", "b", " ", "中", "🙂", "<", ">"])


@fast
@given(
    pieces=st.lists(stop_alphabet, max_size=30),
    stops=st.lists(st.lists(stop_alphabet, min_size=1, max_size=4).map("".join), min_size=1, max_size=3),
    data=st.data(),
)
def test_stop_strings_cut_at_the_same_place_for_any_chunking(
    tokenizer: TextTokenizer, pieces: list[str], stops: list[str], data: st.DataObject
) -> None:
    ids = tokenizer.encode("".join(pieces))
    detokenizer = IncrementalDetokenizer(tokenizer, stop=stops)
    emitted = "".join(stream(detokenizer, split_into_chunks(ids, data)))
    expected, expect_stop = _expected_text_before_stop(tokenizer.decode(ids), stops)
    assert emitted == expected
    assert detokenizer.stopped == expect_stop


@fast
@given(ids=token_ids, stops=st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=3), data=st.data())
def test_stop_strings_over_arbitrary_ids(
    tokenizer: TextTokenizer, ids: list[int], stops: list[str], data: st.DataObject
) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, stop=stops)
    emitted = "".join(stream(detokenizer, split_into_chunks(ids, data)))
    expected, expect_stop = _expected_text_before_stop(tokenizer.decode(ids), stops)
    assert emitted == expected
    assert detokenizer.stopped == expect_stop
