"""The scheduler checks what its internal port receives as the tokenizer checks public
requests: a caller past the credentials cannot send what the front door would refuse."""

import math

import pytest
from pagedserve.v1 import common_pb2, scheduler_pb2

from services.common.errors import InvalidArgumentError
from services.scheduler.submit_checks import checked_prompt

VOCAB_SIZE = 100


def _refusal(**fields: object) -> str:
    request = scheduler_pb2.SubmitRequest(**{"request_id": "r", "prompt_token_ids": [1, 2], **fields})
    with pytest.raises(InvalidArgumentError) as refused:
        checked_prompt(request, VOCAB_SIZE)
    return str(refused.value)


def test_a_good_request_passes() -> None:
    request = scheduler_pb2.SubmitRequest(request_id="r", prompt_token_ids=[1, 2, 99])
    assert checked_prompt(request, VOCAB_SIZE) == [1, 2, 99]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"request_id": ""}, "request_id: must not be empty"),
        ({"prompt_token_ids": [1, 100]}, "prompt_token_ids"),
        ({"sampling": common_pb2.SamplingParams(temperature=math.nan)}, "sampling.temperature"),
        ({"sampling": common_pb2.SamplingParams(n=200)}, "sampling.n: must be in [1,"),
        ({"sampling": common_pb2.SamplingParams(prompt_logprobs=99)}, "sampling.prompt_logprobs"),
        (
            {"sampling": common_pb2.SamplingParams(structured_output={"regex": "("})},
            "sampling.structured_output",
        ),
    ],
)
def test_what_the_front_door_refuses_is_refused(fields: dict, message: str) -> None:
    assert message in _refusal(**fields)
