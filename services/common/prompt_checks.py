"""The rules a prompt must meet, applied by the tokenizer to public requests and by the
scheduler to every request it is sent, with the same words in both. Each failure raises
InvalidArgumentError naming the field and the limit it broke."""

from collections.abc import Sequence

from pagedserve.v1 import common_pb2

from services.common.errors import InvalidArgumentError


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    """Every id must lie in [0, vocab_size); the error names the first one that does not."""
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return
    for index, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidArgumentError(f"{field}[{index}]", f"must be in [0, {vocab_size}), got {token_id}")


def check_prompt_length(
    num_prompt_tokens: int,
    sampling: common_pb2.SamplingParams,
    max_model_len: int,
    prompt_field: str = "prompt_token_ids",
) -> int:
    """The number of tokens the request may generate: max_tokens when given, else all the
    room max_model_len leaves after the prompt.

    max_model_len: the most tokens one sequence may hold, prompt and completion together
    (the model's length, capped by the KV cache so that a sequence alone in it can finish).
    The prompt must leave room for at least one generated token."""
    if num_prompt_tokens == 0:
        raise InvalidArgumentError(prompt_field, "has no tokens")
    if num_prompt_tokens >= max_model_len:
        raise InvalidArgumentError(
            prompt_field,
            f"has {num_prompt_tokens} tokens, but a sequence may hold at most {max_model_len} tokens "
            "(prompt and completion together), which leaves no room to generate",
        )
    if not sampling.HasField("max_tokens"):
        return max_model_len - num_prompt_tokens
    total = num_prompt_tokens + sampling.max_tokens
    if total > max_model_len:
        raise InvalidArgumentError(
            "sampling.max_tokens",
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({sampling.max_tokens}) = {total} exceeds "
            f"the {max_model_len} tokens a sequence may hold; at most {max_model_len - num_prompt_tokens} "
            "tokens can be generated",
        )
    return sampling.max_tokens
