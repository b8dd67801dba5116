"""What the scheduler checks in every request it is sent, on Submit and on a Session
alike: the same checks, in the same words, as the tokenizer applies to public requests
(services/common/sampling_checks.py), because a caller of the internal port may be
anything that got past its credentials."""

from pagedserve.v1 import scheduler_pb2

from services.common.errors import InvalidArgumentError
from services.common.prompt_checks import check_token_ids
from services.common.sampling_checks import check_request_id, validate_sampling
from services.common.structured_output import check_structured_output

MAX_REQUEST_ID_CHARS = 256


def checked_prompt(request: scheduler_pb2.SubmitRequest, vocab_size: int) -> list[int]:
    """The request's prompt, once the request passed every check; raises
    InvalidArgumentError naming the first field that did not."""
    if not request.request_id:
        raise InvalidArgumentError("request_id", "must not be empty")
    check_request_id(request.request_id, MAX_REQUEST_ID_CHARS)
    prompt = list(request.prompt_token_ids)
    check_token_ids(prompt, vocab_size, "prompt_token_ids")
    validate_sampling(request.sampling, vocab_size)
    if request.sampling.HasField("structured_output"):
        check_structured_output(request.sampling.structured_output)
    return prompt
