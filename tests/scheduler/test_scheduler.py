"""The scheduler driven by a fake worker (tests/support/scheduler_harness.py): the worker protocol,
chunked prefill, stop conditions, admission checks, aborts and preemption by recompute."""

from collections import deque
from collections.abc import Callable, Sequence

import pytest
from pagedserve.v1 import common_pb2, worker_pb2

from services.common.errors import UnavailableError
from services.scheduler.config import SchedulerConfig
from services.scheduler.outputs import RequestOutput
from services.scheduler.scheduler import Scheduler
from tests.support.fake_worker import EOS_TOKEN_IDS, LENGTH, STOP, VOCAB, FakeWorker, reference_output
from tests.support.scheduler_harness import ABORT, Harness, sampling

# --- one request -----------------------------------------------------------------------------


def test_prefill_then_decode_speaks_the_worker_protocol() -> None:
    h = Harness(num_blocks=16, block_size=4)
    prompt = [5, 6, 7, 8, 9, 10]
    h.add("a", prompt, sampling(max_tokens=4, ignore_eos=True))
    outputs = h.step()
    first = h.steps[0]
    assert first.step_id == 1
    new = [(n.seq_id, list(n.token_ids), n.num_computed_tokens) for n in first.new_sequences]
    assert new == [(1, prompt, 0)]
    assert len(first.scheduled) == 1 and first.scheduled[0].num_new_tokens == 6
    assert len(first.scheduled[0].new_block_ids) == 2
    assert outputs is not None and len(outputs) == 1 and not outputs[0].finished

    h.step()  # computes token 7 of 8 slots: no new block
    assert h.steps[1].step_id == 2 and not h.steps[1].new_sequences
    scheduled = [(s.seq_id, s.num_new_tokens, list(s.new_block_ids)) for s in h.steps[1].scheduled]
    assert scheduled == [(1, 1, [])]
    h.step()  # token 8
    h.step()  # token 9 needs a third block
    assert len(h.steps[3].scheduled[0].new_block_ids) == 1
    assert h.finals["a", 0].finish_reason == LENGTH
    assert h.tokens["a", 0] == reference_output(prompt, sampling(max_tokens=4, ignore_eos=True), 1024)[0]
    assert h.step() is None
    assert h.scheduler.stats().num_steps == 4


def test_chunked_prefill_of_a_prompt_many_times_the_budget() -> None:
    h = Harness(num_blocks=32, block_size=4, max_num_batched_tokens=8)
    prompt = [(3 * i) % VOCAB for i in range(50)]
    params = sampling(max_tokens=3, ignore_eos=True)
    h.add("long", prompt, params)
    chunk_sizes = []
    while h.step() == []:
        chunk_sizes.append(h.steps[-1].scheduled[0].num_new_tokens)
    chunk_sizes.append(h.steps[-1].scheduled[0].num_new_tokens)
    assert chunk_sizes == [8] * 6 + [2]
    assert [len(s.new_sequences) for s in h.steps] == [1] + [0] * 6
    assert [len(s.scheduled[0].new_block_ids) for s in h.steps] == [2] * 6 + [1]
    h.drain()
    assert h.tokens["long", 0] == reference_output(prompt, params, 1024)[0]


def test_running_sequences_go_first_and_a_newcomer_gets_the_rest_of_the_budget() -> None:
    h = Harness(num_blocks=32, block_size=4, max_num_batched_tokens=10)
    h.add("a", [1, 2, 3], sampling(max_tokens=20, ignore_eos=True))
    h.add("b", [4, 5, 6], sampling(max_tokens=20, ignore_eos=True))
    h.step()
    h.add("c", list(range(2, 30)), sampling(max_tokens=2, ignore_eos=True))
    h.step()
    assert [s.num_new_tokens for s in h.steps[-1].scheduled] == [1, 1, 8]
    assert [n.seq_id for n in h.steps[-1].new_sequences] == [3]


def test_max_num_seqs_limits_the_running_set() -> None:
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=2)
    for i in range(5):
        h.add(f"r{i}", [i + 2, i + 3], sampling(max_tokens=3, ignore_eos=True))
    h.step()
    assert h.scheduler.stats().num_running == 2 and h.scheduler.stats().num_waiting == 3
    h.drain()
    assert max(len(s.scheduled) for s in h.steps) == 2
    assert sorted(h.finals) == [(f"r{i}", 0) for i in range(5)]


# --- stop conditions ---------------------------------------------------------------------


def scripted(tokens: list[int]) -> Callable[[Sequence[int], int], int]:
    """Samples tokens[k] as the k-th generated token of any 3-token prompt."""
    return lambda context, index: tokens[len(context) - 3]


@pytest.mark.parametrize(
    ("params", "max_model_len", "expected_tokens", "expected_reason"),
    [
        (sampling(), 100, [7, 8, 1], STOP),  # eos 1
        (sampling(ignore_eos=True, max_tokens=5), 100, [7, 8, 1, 9, 0], LENGTH),
        (sampling(stop_token_ids=[8]), 100, [7, 8], STOP),
        (sampling(max_tokens=2), 100, [7, 8], LENGTH),
        (sampling(ignore_eos=True), 7, [7, 8, 1, 9], LENGTH),  # max_model_len 7 = 3 + 4
        (sampling(ignore_eos=True, stop_token_ids=[9], max_tokens=4), 100, [7, 8, 1, 9], STOP),
    ],
)
def test_stop_conditions(
    params: common_pb2.SamplingParams, max_model_len: int, expected_tokens: list[int], expected_reason: int
) -> None:
    sampler = scripted([7, 8, 1, 9, 0, 5, 5, 5])
    h = Harness(num_blocks=16, block_size=2, max_model_len=max_model_len, sampler=sampler)
    h.add("a", [2, 3, 4], params)
    h.drain()
    assert h.tokens["a", 0] == expected_tokens
    assert h.finals["a", 0].finish_reason == expected_reason
    assert h.finals["a", 0].num_prompt_tokens == 3
    assert h.finals["a", 0].num_output_tokens == len(expected_tokens)


def test_output_converts_to_a_submit_response() -> None:
    out = RequestOutput("a", 2, [4], LENGTH, num_prompt_tokens=3, num_output_tokens=2, num_cached_tokens=16)
    response = out.to_proto()
    assert list(response.token_ids) == [4] and response.finish_reason == LENGTH and response.index == 2
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (3, 2, 16)
    running = RequestOutput("a", 0, [4], common_pb2.FINISH_REASON_UNSPECIFIED, 3, 1).to_proto()
    assert not running.finish_reason and running.usage.completion_tokens == 1


# --- admission checks ----------------------------------------------------------------------


def test_add_request_rejects_bad_requests() -> None:
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=4), 100, 2, 1024, EOS_TOKEN_IDS)
    assert scheduler.max_model_len == 8  # capped by the 4-block pool
    scheduler.add_request("a", [1, 2], sampling())
    with pytest.raises(ValueError, match="already in flight"):
        scheduler.add_request("a", [1, 2], sampling())
    with pytest.raises(ValueError):
        scheduler.add_request("big", list(range(8)), sampling())
    scheduler.add_request("fits", list(range(7)), sampling())
    with pytest.raises(ValueError):
        scheduler.add_request("empty", [], sampling())
    with pytest.raises(ValueError):
        scheduler.add_request("zero", [1], sampling(max_tokens=0))
    with pytest.raises(ValueError, match="sampling.max_tokens"):
        scheduler.add_request("never fits", [1, 2], sampling(max_tokens=7))
    scheduler.add_request("just fits", [1, 2], sampling(max_tokens=6))
    with pytest.raises(ValueError, match="sampling.n"):
        scheduler.add_request("too many", [1, 2], sampling(n=257))
    with pytest.raises(ValueError, match="sampling.n"):
        scheduler.add_request("none", [1, 2], sampling(n=0))
    short_model = Scheduler(SchedulerConfig(), 100, 2, 5, EOS_TOKEN_IDS)
    with pytest.raises(ValueError):
        short_model.add_request("a", list(range(5)), sampling())


# --- aborts --------------------------------------------------------------------------------


def test_abort_a_waiting_request() -> None:
    h = Harness(num_blocks=16, block_size=2, max_num_seqs=1)
    h.add("a", [2, 3], sampling(max_tokens=3, ignore_eos=True))
    h.add("b", [4, 5], sampling(max_tokens=3, ignore_eos=True))
    h.step()
    [out] = h.abort("b") or []
    assert out.finished and out.request_finished and out.finish_reason == ABORT and out.new_token_ids == []
    assert h.abort("b") is None and h.abort("nobody") is None
    h.drain()
    assert all(not s.finished_seq_ids or list(s.finished_seq_ids) == [1] for s in h.steps)


def test_abort_a_running_request_frees_its_blocks_now() -> None:
    h = Harness(num_blocks=16, block_size=2)
    h.add("a", [2, 3, 4], sampling(max_tokens=9, ignore_eos=True))
    h.add("b", [4, 5], sampling(max_tokens=3, ignore_eos=True))
    h.step()
    free_before = h.scheduler.block_manager.num_free_blocks
    [out] = h.abort("a") or []
    assert out.finish_reason == ABORT and out.num_output_tokens == 1
    assert h.scheduler.block_manager.num_free_blocks == free_before + 2
    h.step()
    assert list(h.steps[-1].finished_seq_ids) == [1]
    assert [s.seq_id for s in h.steps[-1].scheduled] == [2]
    h.drain()


def test_result_for_a_request_aborted_during_the_step_is_ignored() -> None:
    h = Harness(num_blocks=16, block_size=2)
    h.add("a", [2, 3, 4], sampling(max_tokens=9, ignore_eos=True))
    h.add("b", [4, 5], sampling(max_tokens=9, ignore_eos=True))
    scheduled = h.schedule()
    assert scheduled is not None
    h.abort("a")
    h.add("a", [9, 9], sampling(max_tokens=2, ignore_eos=True))  # the id may be reused at once
    outputs = h.finish_step(scheduled)
    assert [o.request_id for o in outputs] == ["b"]
    h.drain()
    assert len(h.tokens["a", 0]) == 2


def test_abort_all_finishes_everything_and_frees_every_block() -> None:
    h = Harness(num_blocks=6, block_size=2, max_num_seqs=2)
    for i in range(4):
        h.add(f"r{i}", [i + 2, i + 3, 4], sampling(max_tokens=9, ignore_eos=True))
    h.step()
    outputs = h.scheduler.abort_all()
    assert [o.request_id for o in outputs] == ["r0", "r1", "r2", "r3"]
    assert all(o.finish_reason == ABORT for o in outputs)
    assert not h.scheduler.has_unfinished_requests()
    stats = h.scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, 6)


def test_abort_all_after_losing_the_worker_starts_a_fresh_stream() -> None:
    h = Harness(num_blocks=6, block_size=2)
    h.add("a", [2, 3], sampling(max_tokens=9, ignore_eos=True))
    h.step()
    assert h.schedule() is not None  # in flight when the worker dies
    h.scheduler.abort_all()
    h.worker, h.in_flight, h.blocks_of_step = FakeWorker(6, 2), deque(), {}
    h.add("b", [4, 5], sampling(max_tokens=2, ignore_eos=True))
    h.step()
    assert h.steps[-1].step_id == 1 and not h.steps[-1].finished_seq_ids
    h.drain()


# --- preemption ----------------------------------------------------------------------------


def test_preemption_recomputes_the_newest_request_without_changing_outputs() -> None:
    h = Harness(num_blocks=4, block_size=2)
    params = sampling(max_tokens=5, ignore_eos=True)
    h.add("old", [2, 3, 4], params)
    h.add("new", [5, 6], params)
    h.step()  # old: 2 blocks, new: 1 block
    h.step()  # old needs no block for token 4; new takes the last block for its token 3
    h.step()  # old needs a 3rd block for token 5: new is preempted
    stats = h.scheduler.stats()
    assert stats.num_preemptions == 1 and (stats.num_running, stats.num_waiting) == (1, 1)
    assert h.scheduler.waiting[0].request_id == "new"
    assert [s.seq_id for s in h.steps[-1].scheduled] == [1]
    assert list(h.steps[-1].finished_seq_ids) == [2]
    tokens_before = list(h.tokens["new", 0])
    h.drain()
    readmission = next(n for s in h.steps for n in s.new_sequences if n.seq_id > 2)
    assert list(readmission.token_ids) == [5, 6] + tokens_before
    assert readmission.num_computed_tokens == 0
    for request_id, prompt in (("old", [2, 3, 4]), ("new", [5, 6])):
        assert h.tokens[request_id, 0] == reference_output(prompt, params, 8)[0]


def test_a_sequence_never_outgrows_the_pool_when_alone() -> None:
    h = Harness(num_blocks=3, block_size=2)
    h.add("a", [2, 3], sampling(ignore_eos=True))
    h.drain()
    assert h.finals["a", 0].finish_reason == LENGTH and len(h.tokens["a", 0]) == 4
    assert h.scheduler.stats().num_preemptions == 0


# --- protocol misuse ----------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True])
def test_steps_in_flight_are_capped_and_results_must_match_the_oldest(overlap: bool) -> None:
    h = Harness(num_blocks=8, block_size=2, overlap=overlap)
    h.add("a", [2, 3], sampling(max_tokens=4, ignore_eos=True))
    scheduled = h.schedule()
    assert scheduled is not None
    if overlap:
        # The second step computes the token the first samples, which it does not know yet.
        ahead = h.schedule()
        assert ahead is not None and [(s.seq_id, s.num_new_tokens) for s in ahead.scheduled] == [(1, 1)]
        with pytest.raises(RuntimeError):
            h.scheduler.update_from_output(
                ahead, worker_pb2.StepResult(step_id=2, seq_ids=[1], token_ids=[5])
            )
    with pytest.raises(RuntimeError):
        h.scheduler.schedule()
    wrong_step = worker_pb2.StepResult(step_id=2, seq_ids=[1], token_ids=[5])
    with pytest.raises(UnavailableError):
        h.scheduler.update_from_output(scheduled, wrong_step)
    missing_token = worker_pb2.StepResult(step_id=1, seq_ids=[1], token_ids=[])
    with pytest.raises(UnavailableError):
        h.scheduler.update_from_output(scheduled, missing_token)
    stranger = worker_pb2.StepResult(step_id=1, seq_ids=[7], token_ids=[5])
    with pytest.raises(UnavailableError):
        h.scheduler.update_from_output(scheduled, stranger)
    h.finish_step(scheduled)
    with pytest.raises(RuntimeError):
        h.scheduler.update_from_output(scheduled, worker_pb2.StepResult(step_id=1))
    h.drain()
    assert h.tokens["a", 0] == reference_output([2, 3], sampling(max_tokens=4, ignore_eos=True), 16)[0]


def test_nothing_to_run_gives_no_step() -> None:
    h = Harness(num_blocks=8, block_size=2)
    assert h.scheduler.schedule() is None
    assert not h.scheduler.has_unfinished_requests()
    h.add("a", [2], sampling(max_tokens=1))
    assert h.scheduler.has_unfinished_requests()
    h.drain()
    stats = h.scheduler.stats()
    assert (stats.num_steps, stats.num_total_blocks, stats.num_free_blocks) == (1, 8, 8)
