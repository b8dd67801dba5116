"""Stream messages per step: beyond the budget, completions' tokens wait merged, the
longest-waiting first; first tokens and last messages never wait; a step's unused budget
is saved for later steps, up to a limit; a frontend that keeps up takes more; nothing is
lost or reordered."""

import pytest
from pagedserve.v1 import common_pb2

from services.scheduler.coalescing import KEEPING_UP_FACTOR, SAVED_STEPS, Frontend, OutputCoalescer
from services.scheduler.outputs import RequestOutput
from tests.support.fake_worker import reference_output
from tests.support.scheduler_harness import Harness, sampling

UNFINISHED, LENGTH = common_pb2.FINISH_REASON_UNSPECIFIED, common_pb2.FINISH_REASON_LENGTH


def _output(
    request_id: str,
    tokens: list[int],
    num_output_tokens: int,
    finish_reason: int = UNFINISHED,
    request_finished: bool = False,
) -> RequestOutput:
    return RequestOutput(
        request_id,
        0,
        tokens,
        finish_reason,
        num_prompt_tokens=3,
        num_output_tokens=num_output_tokens,
        request_finished=request_finished,
    )


def test_beyond_the_budget_tokens_wait_merged_oldest_first() -> None:
    coalescer = OutputCoalescer(max_messages_per_step=2)
    # First tokens all leave at once, whatever the budget.
    first = coalescer.pace([_output(r, [1], 1) for r in "abc"])
    assert [o.request_id for o in first] == ["a", "b", "c"] and len(coalescer) == 0
    # Two messages a step: c waits, merged with its next token.
    second = coalescer.pace([_output(r, [2], 2) for r in "abc"])
    assert [(o.request_id, o.new_token_ids) for o in second] == [("a", [2]), ("b", [2])]
    third = coalescer.pace([_output(r, [3], 3) for r in "abc"])
    assert [(o.request_id, o.new_token_ids) for o in third] == [("c", [2, 3]), ("a", [3])]
    # A last message takes what its completion held, at once, beyond the budget.
    last = coalescer.pace(
        [_output("a", [4], 4), _output("b", [4], 4, LENGTH, request_finished=True), _output("c", [4], 4)]
    )
    assert [(o.request_id, o.new_token_ids, o.num_output_tokens, o.request_finished) for o in last] == [
        ("b", [3, 4], 4, True),
        ("a", [4], 4, False),
    ]
    assert len(coalescer) == 1 and coalescer.take_due() == [_output("c", [4], 4)]


def test_each_group_of_streams_has_its_own_budget() -> None:
    # Requests a and b stream through one frontend, c and d through another.
    group_of = {"a": 1, "b": 1, "c": 2, "d": 2}.__getitem__
    coalescer = OutputCoalescer(max_messages_per_step=1, group_of=group_of)
    coalescer.pace([_output(r, [1], 1) for r in "abcd"])
    second = coalescer.pace([_output(r, [2], 2) for r in "abcd"])
    # One message per frontend, the longest waiting of each.
    assert [o.request_id for o in second] == ["a", "c"] and len(coalescer) == 2
    third = coalescer.pace([_output(r, [3], 3) for r in "abcd"])
    assert [(o.request_id, o.new_token_ids) for o in third] == [("b", [2, 3]), ("d", [2, 3])]
    # A last message leaving at once uses up its own frontend's budget only.
    fourth = coalescer.pace([_output("a", [4], 4, LENGTH, request_finished=True), _output("c", [4], 4)])
    assert [(o.request_id, o.new_token_ids) for o in fourth] == [("a", [3, 4]), ("c", [3, 4])]


def test_a_frontend_that_keeps_up_gets_its_tokens_at_once_up_to_a_limit() -> None:
    budget = 2
    busy, idle = Frontend(), Frontend(keeps_up=True)

    def sent_per_frontend(num_streams: int) -> tuple[int, int]:
        # A step of num_streams decoding streams on each frontend, after their first tokens.
        streams = {
            f"{name}{i}": frontend
            for name, frontend in (("b", busy), ("i", idle))
            for i in range(num_streams)
        }
        coalescer = OutputCoalescer(max_messages_per_step=budget, group_of=streams.__getitem__)
        coalescer.pace([_output(r, [1], 1) for r in streams])
        sent = coalescer.pace([_output(r, [2], 2) for r in streams])
        return sum(streams[o.request_id] is busy for o in sent), sum(
            streams[o.request_id] is idle for o in sent
        )

    # Up to KEEPING_UP_FACTOR times the budget, the frontend that keeps up gets every token.
    assert sent_per_frontend(budget * KEEPING_UP_FACTOR) == (budget, budget * KEEPING_UP_FACTOR)
    # Beyond it tokens wait anyway: the budget holds for both.
    assert sent_per_frontend(budget * KEEPING_UP_FACTOR + 1) == (budget, budget)
    # Until it says otherwise: then it is held to the budget like the other.
    idle.keeps_up = False
    assert sent_per_frontend(budget * KEEPING_UP_FACTOR) == (budget, budget)


def test_a_step_spends_the_budget_earlier_steps_left() -> None:
    coalescer = OutputCoalescer(max_messages_per_step=2)
    coalescer.pace([_output(r, [1], 1) for r in "abcd"])
    # Four streams, two messages a step: two wait.
    assert [o.request_id for o in coalescer.pace([_output(r, [2], 2) for r in "abcd"])] == ["a", "b"]
    # A step where only c's and d's held tokens are due sends them and saves nothing.
    assert [o.request_id for o in coalescer.take_due()] == ["c", "d"]
    # Steps with one stream left save one message each ...
    for step in range(3):
        assert len(coalescer.pace([_output("a", [3 + step], 3 + step)])) == 1
    # ... which a step of four streams then spends: all four leave at once.
    fourth = coalescer.pace([_output(r, [6], 6) for r in "abcd"])
    assert [o.request_id for o in fourth] == ["a", "b", "c", "d"] and len(coalescer) == 0
    # Savings stop at SAVED_STEPS steps' budget.
    many = [_output(f"r{i}", [2], 2) for i in range(2 * (SAVED_STEPS + 1) + 3)]
    coalescer.pace([_output(o.request_id, [1], 1) for o in many])
    for _ in range(SAVED_STEPS + 5):
        coalescer.take_due()
    assert len(coalescer.pace(many)) == 2 * (SAVED_STEPS + 1) and len(coalescer) == 3


def test_no_budget_sends_every_output_at_once() -> None:
    coalescer = OutputCoalescer(max_messages_per_step=None)
    outputs = [_output(r, [2], 2) for r in "abc"]
    assert coalescer.pace(outputs) == outputs and len(coalescer) == 0


def test_streams_carry_every_token_once_in_order() -> None:
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=8)
    prompts = {f"r{i}": [2, 3, i + 4] for i in range(6)}
    params = {request_id: sampling(max_tokens=5 + i, ignore_eos=True) for i, request_id in enumerate(prompts)}
    for request_id, prompt in prompts.items():
        h.add(request_id, prompt, params[request_id])
    coalescer = OutputCoalescer(max_messages_per_step=2)
    streamed: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    num_messages = num_steps = num_must_go = 0
    # As the engine does: each step's outputs go through the coalescer.
    while (outputs := h.pipeline_step()) is not None:
        sent = coalescer.pace(outputs)
        num_steps += 1
        num_must_go += sum(1 for o in outputs if o.finished or o.num_output_tokens == len(o.new_token_ids))
        num_messages += len(sent)
        # Over any run of steps: two messages a step, and those that may not wait.
        assert num_messages <= 2 * num_steps + num_must_go
        for output in sent:
            assert output.num_output_tokens == len(streamed[output.request_id]) + len(output.new_token_ids)
            streamed[output.request_id].extend(output.new_token_ids)
    assert len(coalescer) == 0
    for request_id, prompt in prompts.items():
        assert streamed[request_id] == reference_output(prompt, params[request_id], 1024)[0]
    assert num_messages < sum(len(tokens) for tokens in streamed.values())


def test_under_a_load_over_the_budget_nothing_is_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full batches send what they sent without savings: once every step has more streams
    than the budget, each step sends its budget exactly, with or without SAVED_STEPS."""
    from services.scheduler import coalescing

    def messages_per_step(saved_steps: int) -> list[int]:
        monkeypatch.setattr(coalescing, "SAVED_STEPS", saved_steps)
        coalescer = OutputCoalescer(max_messages_per_step=4)
        streams = [f"r{i}" for i in range(10)]
        coalescer.pace([_output(r, [1], 1) for r in streams])
        return [len(coalescer.pace([_output(r, [n], n) for r in streams])) for n in range(2, 30)]

    assert messages_per_step(SAVED_STEPS) == messages_per_step(0) == [4] * 28
