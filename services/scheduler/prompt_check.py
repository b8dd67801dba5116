"""The checks the scheduler's gRPC face makes on a prompt before the engine sees it."""

from pagedserve.v1 import common_pb2

from services.common.errors import InvalidArgumentError


def check_prompt(prompt_token_ids: list[int], model: common_pb2.ModelInfo) -> None:
    """The scheduler trusts no caller blindly: the worker would index out of bounds."""
    if not prompt_token_ids:
        raise InvalidArgumentError("prompt_token_ids", "must hold at least one token")
    if len(prompt_token_ids) >= model.max_model_len:
        raise InvalidArgumentError(
            "prompt_token_ids",
            f"{len(prompt_token_ids)} tokens leave no room to generate within max_model_len {model.max_model_len}",
        )
    for i, token_id in enumerate(prompt_token_ids):
        if not 0 <= token_id < model.vocab_size:
            raise InvalidArgumentError(
                f"prompt_token_ids[{i}]", f"{token_id} is outside the vocabulary [0, {model.vocab_size})"
            )
