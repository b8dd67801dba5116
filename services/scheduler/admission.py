"""Checks a request must pass before it may queue: one that could never run is refused
now (INVALID_ARGUMENT) rather than left waiting forever."""

from collections.abc import Sequence

from pagedserve.v1 import common_pb2
from services.common.errors import InvalidArgumentError


def check_request(
    prompt_token_ids: Sequence[int],
    sampling: common_pb2.SamplingParams,
    max_model_len: int,
    max_num_seqs: int,
) -> None:
    """max_model_len: the most tokens one sequence may hold, the model's length capped by
    the KV pool, so that every admitted sequence can finish even when alone in the pool."""
    if not prompt_token_ids:
        raise InvalidArgumentError("prompt_token_ids", "the prompt is empty")
    # The prompt plus the first sampled token must fit the model and the KV pool.
    if len(prompt_token_ids) + 1 > max_model_len:
        raise InvalidArgumentError(
            "prompt_token_ids",
            f"{len(prompt_token_ids)} prompt tokens leave no room to generate within "
            f"{max_model_len} tokens (model length and KV cache size)",
        )
    if sampling.HasField("max_tokens"):
        if sampling.max_tokens < 1:
            raise InvalidArgumentError("sampling.max_tokens", f"must be at least 1, got {sampling.max_tokens}")
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > max_model_len:
            raise InvalidArgumentError(
                "sampling.max_tokens",
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} "
                f"exceeds the {max_model_len} tokens a sequence may hold (model length and KV cache size)",
            )
    if sampling.HasField("n") and not 1 <= sampling.n <= max_num_seqs:
        raise InvalidArgumentError(
            "sampling.n", f"must be in [1, {max_num_seqs}] (the scheduler's max_num_seqs), got {sampling.n}"
        )
