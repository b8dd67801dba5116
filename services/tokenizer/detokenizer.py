"""Token ids → text deltas for one generated sequence, as the ids arrive.

Two layers: `_IncrementalDecoder` turns ids into text without ever emitting part of a
multi-byte character, and `StopStringMatcher` cuts the text at the first stop string,
holding back text that may turn out to begin one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHARACTER = "\ufffd"

# While the text ends in U+FFFD the decoder waits for the rest of the character. Waiting
# longer than a character's worth of tokens means the U+FFFD is most likely real (invalid
# bytes from the model); the decoder then looks for a split point it can prove safe.
HELD_TOKENS_BEFORE_SPLIT_SEARCH = 6


class TokenDecoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """The text of one sequence, delta by delta. Without a stop string hit, everything
    `add` and `flush` return, concatenated, equals `tokenizer.decode(all ids)`, however
    the ids were split into calls. After a stop string hit (`stopped`), the text returned
    in total is everything before that stop string, and nothing more is returned."""

    def __init__(
        self, tokenizer: TokenDecoder, skip_special_tokens: bool = True, stop: Sequence[str] = ()
    ) -> None:
        self._decoder = _IncrementalDecoder(tokenizer, skip_special_tokens)
        self._stop_matcher = StopStringMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self._stop_matcher.stopped

    def add(self, token_ids: Sequence[int]) -> str:
        """The text that became safe to emit with these ids (may be empty)."""
        if self.stopped:
            return ""
        return self._stop_matcher.feed(self._decoder.add(token_ids))

    def flush(self) -> str:
        """Everything still held back; call once, when generation ended for a reason other
        than a stop string. The held text can still contain a stop string, which then
        cuts it and sets `stopped`."""
        if self.stopped:
            return ""
        text = self._stop_matcher.feed(self._decoder.flush())
        if self.stopped:
            return text
        return text + self._stop_matcher.flush()


class _IncrementalDecoder:
    """Decodes a short window of recent ids per step instead of the whole sequence.

    The window starts at a *safe* index: one where the text of all ids equals the text
    of the ids before it plus the text of the ids after it, whatever comes later. Emitted
    text is the window's text minus the text of its already-emitted prefix; keeping that
    prefix as context (rather than decoding only new ids) matters for decoders that treat
    the start of a sequence specially (e.g. strip a leading space).

    tokenizers' own DecodeStream follows the same idea but cannot hand back text held at
    the end of generation and fails when a window's text stops extending its prefix's;
    both must work here."""

    def __init__(self, tokenizer: TokenDecoder, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []
        # Window index of the first id whose text has not been emitted; a safe index.
        self._read_offset = 0
        self._prefix_text = ""
        self._split_search_threshold = HELD_TOKENS_BEFORE_SPLIT_SEARCH

    def add(self, token_ids: Sequence[int]) -> str:
        self._window.extend(token_ids)
        text = self._decode(self._window)
        # Text that ends with a complete character ends at a safe index; a trailing U+FFFD
        # may be the start of a character whose remaining bytes are still to come.
        if not text.endswith(REPLACEMENT_CHARACTER) and text.startswith(self._prefix_text):
            return self._emit_through(len(self._window), text)
        if len(self._window) - self._read_offset >= self._split_search_threshold:
            return self._emit_through_safe_split(text)
        return ""

    def flush(self) -> str:
        text = self._decode(self._window)
        held_text = text[len(self._prefix_text) :]
        self._window, self._read_offset, self._prefix_text = [], 0, ""
        return held_text

    def _emit_through(self, end: int, text_through_end: str) -> str:
        """Emits the text up to window index `end`, which must be safe, and moves the
        window so that it starts at the old read offset."""
        new_text = text_through_end[len(self._prefix_text) :]
        del self._window[: self._read_offset]
        self._read_offset = end - self._read_offset
        self._prefix_text = self._decode(self._window[: self._read_offset])
        self._split_search_threshold = HELD_TOKENS_BEFORE_SPLIT_SEARCH
        return new_text

    def _emit_through_safe_split(self, text: str) -> str:
        """Finds the latest index at which the held ids split cleanly. An index is safe
        when the ids after it decode to some text and decoding the two sides apart gives
        the same text as decoding them together: had the bytes before it been an
        unfinished character that the next byte continues, decoding apart would turn
        them into extra U+FFFDs (or lose the character) and the texts would differ."""
        for end in range(len(self._window) - 1, self._read_offset, -1):
            head = self._decode(self._window[:end])
            tail = self._decode(self._window[end:])
            if tail and head.startswith(self._prefix_text) and head + tail == text:
                return self._emit_through(end, head)
        # Only an unfinished character and ids without text (skipped special tokens) are
        # held: back off so that a long run of those does not cost a search per token.
        self._split_search_threshold *= 2
        return ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


class StopStringMatcher:
    """Cuts a stream of text at the first stop string to complete (ties: the one that
    starts first), so that the result does not depend on how the text was chunked."""

    def __init__(self, stop: Sequence[str]) -> None:
        # Validation rejects empty stop strings; one that slipped through would match
        # everywhere, so it is ignored.
        self._stop_strings = tuple(dict.fromkeys(s for s in stop if s))
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of the text so far that is certainly before any stop string."""
        if self.stopped:
            return ""
        if not self._stop_strings:
            return text
        buffer = self._pending + text
        stop_start = self._first_completed_stop(buffer)
        if stop_start is not None:
            self.stopped = True
            self._pending = ""
            return buffer[:stop_start]
        emit_end = len(buffer) - self._longest_possible_stop_start(buffer)
        self._pending = buffer[emit_end:]
        return buffer[:emit_end]

    def flush(self) -> str:
        """The text held back as a possible stop string start, once no more text comes."""
        held, self._pending = self._pending, ""
        return "" if self.stopped else held

    def _first_completed_stop(self, buffer: str) -> int | None:
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stop_strings:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def _longest_possible_stop_start(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop
        string: text that a later chunk may still turn into a stop string."""
        longest = 0
        for stop in self._stop_strings:
            position = buffer.find(stop[0], max(0, len(buffer) - len(stop) + 1))
            while position != -1:
                if stop.startswith(buffer[position:]):
                    longest = max(longest, len(buffer) - position)
                    break
                position = buffer.find(stop[0], position + 1)
        return longest
