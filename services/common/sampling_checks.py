"""The checks of a request's sampling parameters and id, applied by the tokenizer to public
requests and by the scheduler to every request it is sent (whoever sent it), with the
same words in both. Each failure raises InvalidArgumentError naming the field and the
limit it broke."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pagedserve.v1 import common_pb2

from services.common.errors import InvalidArgumentError
from services.common.prompt_checks import check_token_ids


@dataclass(frozen=True)
class SamplingLimits:
    """Bounds that protect the server rather than follow from the model."""

    max_stop_strings: int = 16
    # Text that may begin a stop string is held back from the client, so a long stop
    # string delays streaming by up to its length.
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    # Completions per request: each takes a seat in the scheduler's batch.
    max_n: int = 16
    # Top tokens whose logprobs come back per position (OpenAI's limit).
    max_logprobs: int = 20
    max_logit_bias_entries: int = 1024


def validate_sampling(
    sampling: common_pb2.SamplingParams, vocab_size: int, limits: SamplingLimits = SamplingLimits()
) -> None:
    if sampling.HasField("temperature"):
        temperature = sampling.temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgumentError(
                "sampling.temperature", f"must be a finite number >= 0, got {temperature:g}"
            )
    if sampling.HasField("top_p"):
        top_p = sampling.top_p
        # Written so that NaN fails too.
        if not 0 < top_p <= 1:
            raise InvalidArgumentError("sampling.top_p", f"must be in (0, 1], got {top_p:g}")
    if sampling.top_k < -1:
        raise InvalidArgumentError(
            "sampling.top_k", f"must be -1 or 0 (off) or positive, got {sampling.top_k}"
        )
    if sampling.HasField("min_p") and not 0 <= sampling.min_p <= 1:
        raise InvalidArgumentError("sampling.min_p", f"must be in [0, 1], got {sampling.min_p:g}")
    _validate_logit_bias(sampling.logit_bias, vocab_size, limits)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sampling, name)
        if not -2 <= value <= 2:
            raise InvalidArgumentError(f"sampling.{name}", f"must be in [-2, 2], got {value:g}")
    if sampling.HasField("repetition_penalty") and not 0 < sampling.repetition_penalty <= 2:
        raise InvalidArgumentError(
            "sampling.repetition_penalty", f"must be in (0, 2], got {sampling.repetition_penalty:g}"
        )
    if sampling.HasField("logprobs") and not 0 <= sampling.logprobs <= limits.max_logprobs:
        raise InvalidArgumentError(
            "sampling.logprobs", f"must be in [0, {limits.max_logprobs}], got {sampling.logprobs}"
        )
    if sampling.HasField("prompt_logprobs") and not 0 <= sampling.prompt_logprobs <= limits.max_logprobs:
        raise InvalidArgumentError(
            "sampling.prompt_logprobs",
            f"must be in [0, {limits.max_logprobs}], got {sampling.prompt_logprobs}",
        )
    if sampling.HasField("max_tokens") and sampling.max_tokens < 1:
        raise InvalidArgumentError("sampling.max_tokens", f"must be at least 1, got {sampling.max_tokens}")
    if sampling.min_tokens < 0 or (
        sampling.HasField("max_tokens") and sampling.min_tokens > sampling.max_tokens
    ):
        raise InvalidArgumentError(
            "sampling.min_tokens", f"must be in [0, max_tokens], got {sampling.min_tokens}"
        )
    if sampling.HasField("n") and not 1 <= sampling.n <= limits.max_n:
        raise InvalidArgumentError("sampling.n", f"must be in [1, {limits.max_n}], got {sampling.n}")
    _validate_stop_strings(sampling.stop, limits)
    if len(sampling.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgumentError(
            "sampling.stop_token_ids",
            f"at most {limits.max_stop_token_ids} stop token ids are allowed, got {len(sampling.stop_token_ids)}",
        )
    check_token_ids(sampling.stop_token_ids, vocab_size, "sampling.stop_token_ids")


def check_request_id(request_id: str, max_chars: int) -> None:
    if len(request_id) > max_chars:
        raise InvalidArgumentError(
            "request_id", f"must be at most {max_chars} characters, got {len(request_id)}"
        )


def _validate_logit_bias(logit_bias: Mapping[int, float], vocab_size: int, limits: SamplingLimits) -> None:
    if len(logit_bias) > limits.max_logit_bias_entries:
        raise InvalidArgumentError(
            "sampling.logit_bias",
            f"at most {limits.max_logit_bias_entries} entries are allowed, got {len(logit_bias)}",
        )
    for token_id, bias in sorted(logit_bias.items()):
        if not 0 <= token_id < vocab_size:
            raise InvalidArgumentError(
                f"sampling.logit_bias[{token_id}]", f"token id must be in [0, {vocab_size})"
            )
        # Written so that NaN fails too.
        if not -100 <= bias <= 100:
            raise InvalidArgumentError(
                f"sampling.logit_bias[{token_id}]", f"must be in [-100, 100], got {bias:g}"
            )


def _validate_stop_strings(stop: Sequence[str], limits: SamplingLimits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgumentError(
            "sampling.stop", f"at most {limits.max_stop_strings} stop strings are allowed, got {len(stop)}"
        )
    for index, stop_string in enumerate(stop):
        if not stop_string:
            raise InvalidArgumentError(f"sampling.stop[{index}]", "must not be empty")
        if len(stop_string) > limits.max_stop_string_chars:
            raise InvalidArgumentError(
                f"sampling.stop[{index}]",
                f"must be at most {limits.max_stop_string_chars} characters, got {len(stop_string)}",
            )
