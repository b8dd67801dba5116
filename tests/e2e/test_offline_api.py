"""The offline API (`from pagedserve import LLM, SamplingParams`) runs the engine in this
process and gives what the server gives: the same tokens greedily and for a seed, the same
text after stop strings."""

import re
from pathlib import Path

import pytest
from pagedserve.v1 import common_pb2, generation_pb2

from tests.support.service_stack import Stack

PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def llm(embedded_model_dir: Path):
    from pagedserve import LLM

    return LLM(model=embedded_model_dir, device="cpu", num_kv_blocks=256)


def _server_completions(stack: Stack, sampling: common_pb2.SamplingParams, **prompt) -> dict[int, tuple]:
    """(token ids, text, finish reason) by completion index."""
    request = generation_pb2.GenerateRequest(sampling=sampling, **prompt)
    tokens: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    reasons: dict[int, int] = {}
    for message in stack.generation.Generate(request, timeout=300):
        tokens.setdefault(message.index, []).extend(message.token_ids)
        texts[message.index] = texts.get(message.index, "") + message.text
        reasons[message.index] = message.finish_reason or reasons.get(message.index, 0)
    return {index: (tokens[index], texts[index], reasons[index]) for index in tokens}


def test_greedy_generate_equals_the_server(llm, stack: Stack) -> None:
    from pagedserve import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    assert [output.prompt_token_ids for output in outputs] == [
        list(stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=p)).token_ids) for p in PROMPTS
    ]
    for prompt, output in zip(PROMPTS, outputs):
        served = _server_completions(
            stack, common_pb2.SamplingParams(temperature=0, max_tokens=12), prompt=prompt
        )
        completion = output.outputs[0]
        assert (completion.token_ids, completion.text) == served[0][:2]
        assert completion.finish_reason == "length"
    # Token ids in, the same answer out.
    by_ids = llm.generate([outputs[0].prompt_token_ids], SamplingParams(temperature=0, max_tokens=12))
    assert by_ids[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids


def test_seeded_samples_equal_the_servers(llm, stack: Stack) -> None:
    from pagedserve import SamplingParams

    params = SamplingParams(
        temperature=1.0, top_p=0.9, max_tokens=10, seed=11, n=2, ignore_eos=True, logprobs=2
    )
    output = llm.generate(PROMPTS[0], params)[0]
    served = _server_completions(stack, params.to_proto(), prompt=PROMPTS[0])
    assert [c.token_ids for c in output.outputs] == [served[0][0], served[1][0]]
    for completion in output.outputs:
        assert len(completion.logprobs) == len(completion.token_ids)
        for token_id, position in zip(completion.token_ids, completion.logprobs):
            # The sampled token and the two likeliest (which may include it).
            assert token_id in position and 2 <= len(position) <= 3
            assert max(position.values()) <= 0
    assert output.outputs[0].token_ids != output.outputs[1].token_ids


def test_chat_with_a_stop_string_equals_the_server(llm, stack: Stack) -> None:
    from pagedserve import SamplingParams

    conversation = [{"role": "user", "content": "Name three colours of the rainbow."}]
    params = SamplingParams(temperature=0, max_tokens=24, stop=[","])
    output = llm.chat(conversation, params)[0].outputs[0]
    served = _server_completions(
        stack, params.to_proto(), messages=[generation_pb2.ChatMessage(**m) for m in conversation]
    )
    assert output.text == served[0][1]
    assert output.finish_reason == "stop" and served[0][2] == common_pb2.FINISH_REASON_STOP
    assert "," not in output.text


def test_structured_output_equals_the_servers(llm, stack: Stack) -> None:
    from pagedserve import SamplingParams, StructuredOutputsParams

    pattern = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)"
    params = SamplingParams(
        temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(regex=pattern)
    )
    prompt = "The first moon landing happened on"
    output = llm.generate(prompt, params)[0].outputs[0]
    assert re.fullmatch(pattern, output.text) and output.finish_reason == "stop"
    assert (output.token_ids, output.text) == _server_completions(stack, params.to_proto(), prompt=prompt)[0][
        :2
    ]
