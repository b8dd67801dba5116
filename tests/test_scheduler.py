"""The scheduler driven by a fake worker that keeps per-sequence state from the step
messages alone, as a real worker does, and checks that the messages are consistent."""

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pagedserve.v1 import common_pb2, worker_pb2
from services.common.errors import UnavailableError
from services.scheduler.block_manager import cdiv
from services.scheduler.config import SchedulerConfig
from services.scheduler.outputs import RequestOutput, SchedulerOutput
from services.scheduler.scheduler import Scheduler

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
ABORT = common_pb2.FINISH_REASON_ABORT

VOCAB = 32
EOS_TOKEN_IDS = (0, 1)


def hash_sampler(token_ids: Sequence[int]) -> int:
    """A deterministic stand-in for the model: the next token depends on the whole context."""
    h = 17
    for t in token_ids:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


def sampling(
    max_tokens: int | None = None, ignore_eos: bool = False, stop_token_ids: Sequence[int] = ()
) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(ignore_eos=ignore_eos, stop_token_ids=stop_token_ids)
    if max_tokens is not None:
        params.max_tokens = max_tokens
    return params


@dataclass
class WorkerSeq:
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int] = field(default_factory=list)


class FakeWorker:
    def __init__(
        self, num_blocks: int, block_size: int, sampler: Callable[[Sequence[int]], int] = hash_sampler
    ) -> None:
        self.block_size = block_size
        self.sampler = sampler
        # Each KV slot remembers whose token at which position it holds, so that reading a
        # context through a wrong or shared block table fails loudly.
        self.kv: list[list[tuple[int, int, int] | None]] = [
            [None] * block_size for _ in range(num_blocks)
        ]
        self.seqs: dict[int, WorkerSeq] = {}
        self.seen_seq_ids: set[int] = set()
        self.next_step_id = 1

    def step(self, step: worker_pb2.StepRequest) -> worker_pb2.StepResult:
        step = worker_pb2.StepRequest.FromString(step.SerializeToString())
        assert step.step_id == self.next_step_id
        self.next_step_id += 1
        for seq_id in step.finished_seq_ids:
            del self.seqs[seq_id]
        for new in step.new_sequences:
            assert new.seq_id not in self.seen_seq_ids, "seq_id introduced twice"
            self.seen_seq_ids.add(new.seq_id)
            self.seqs[new.seq_id] = WorkerSeq(list(new.token_ids), new.num_computed_tokens)
        new_ids = {new.seq_id for new in step.new_sequences}
        owner = {b: seq_id for seq_id, seq in self.seqs.items() for b in seq.block_table}
        result = worker_pb2.StepResult(step_id=step.step_id)
        scheduled_ids = [s.seq_id for s in step.scheduled]
        assert len(scheduled_ids) == len(set(scheduled_ids))
        assert new_ids <= set(scheduled_ids)
        for item in step.scheduled:
            seq = self.seqs[item.seq_id]
            for block_id in item.new_block_ids:
                assert block_id not in owner, f"block {block_id} is in use by seq {owner.get(block_id)}"
                owner[block_id] = item.seq_id
                seq.block_table.append(block_id)
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            assert item.num_new_tokens >= 1 and end <= len(seq.token_ids)
            assert len(seq.block_table) == cdiv(end, self.block_size), "blocks do not match the tokens"
            for pos in range(start, end):
                block_id = seq.block_table[pos // self.block_size]
                self.kv[block_id][pos % self.block_size] = (item.seq_id, pos, seq.token_ids[pos])
            seq.num_computed_tokens = end
            if end == len(seq.token_ids):
                context = []
                for pos in range(end):
                    slot = self.kv[seq.block_table[pos // self.block_size]][pos % self.block_size]
                    assert slot is not None and slot[:2] == (item.seq_id, pos), "KV overwritten"
                    context.append(slot[2])
                assert context == seq.token_ids
                token = self.sampler(context)
                seq.token_ids.append(token)
                result.seq_ids.append(item.seq_id)
                result.token_ids.append(token)
        return result


def reference_output(
    prompt: Sequence[int], params: common_pb2.SamplingParams, max_model_len: int,
    sampler: Callable[[Sequence[int]], int] = hash_sampler,
) -> tuple[list[int], int]:
    """What the request yields run alone, with no batching, chunking or preemption."""
    tokens, generated = list(prompt), []
    while True:
        token = sampler(tokens)
        tokens.append(token)
        generated.append(token)
        if token in params.stop_token_ids or (not params.ignore_eos and token in EOS_TOKEN_IDS):
            return generated, STOP
        if params.HasField("max_tokens") and len(generated) >= params.max_tokens:
            return generated, LENGTH
        if len(tokens) >= max_model_len:
            return generated, LENGTH


class Harness:
    def __init__(
        self, *, num_blocks: int, block_size: int, max_model_len: int = 1024, max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192, sampler: Callable[[Sequence[int]], int] = hash_sampler,
    ) -> None:
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        self.scheduler = Scheduler(self.config, num_blocks, block_size, max_model_len, EOS_TOKEN_IDS)
        self.worker = FakeWorker(num_blocks, block_size, sampler)
        self.tokens: dict[str, list[int]] = {}
        self.finals: dict[str, RequestOutput] = {}
        self.steps: list[worker_pb2.StepRequest] = []
        self.in_flight: SchedulerOutput | None = None

    def add(self, request_id: str, prompt: list[int], params: common_pb2.SamplingParams) -> None:
        self.scheduler.add_request(request_id, prompt, params)
        self.tokens[request_id] = []
        self.finals.pop(request_id, None)

    def collect(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            assert out.request_id not in self.finals, "output after the request finished"
            self.tokens[out.request_id].extend(out.new_token_ids)
            assert out.num_output_tokens == len(self.tokens[out.request_id])
            if out.finished:
                self.finals[out.request_id] = out

    def schedule(self) -> SchedulerOutput | None:
        scheduled = self.scheduler.schedule()
        if scheduled is not None:
            assert 0 < scheduled.num_scheduled_tokens <= self.config.max_num_batched_tokens
            assert len(scheduled.scheduled) <= self.config.max_num_seqs
            self.steps.append(scheduled.to_proto())
            self.in_flight = scheduled
        return scheduled

    def finish_step(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        outputs = self.scheduler.update_from_output(scheduled, self.worker.step(self.steps[-1]))
        self.in_flight = None
        self.collect(outputs)
        check_invariants(self.scheduler)
        return outputs

    def step(self) -> list[RequestOutput] | None:
        scheduled = self.schedule()
        return None if scheduled is None else self.finish_step(scheduled)

    def abort(self, request_id: str) -> RequestOutput | None:
        out = self.scheduler.abort_request(request_id)
        if out is not None:
            self.collect([out])
        check_invariants(self.scheduler, mid_step=self.in_flight is not None)
        return out

    def drain(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if self.step() is None:
                break
        assert not self.scheduler.has_unfinished_requests()
        assert self.scheduler.block_manager.num_free_blocks == self.scheduler.block_manager.num_total_blocks


def check_invariants(scheduler: Scheduler, mid_step: bool = False) -> None:
    manager = scheduler.block_manager
    free = manager.free_block_ids
    holders = Counter(b for r in scheduler.running for b in r.block_table)
    assert len(free) == len(set(free))
    assert set(free).isdisjoint(holders)
    assert all(manager.ref_count(b) == holders[b] for b in range(manager.num_total_blocks))
    assert len(free) + len(holders) == manager.num_total_blocks
    for r in scheduler.waiting:
        assert r.block_table == [] and r.num_computed_tokens == 0 and r.seq_id is None
    for r in scheduler.running:
        # Mid-step, blocks for the tokens being computed are held but not yet counted.
        holds_computed = cdiv(r.num_computed_tokens, manager.block_size)
        assert len(r.block_table) >= holds_computed if mid_step else len(r.block_table) == holds_computed
        assert r.num_computed_tokens < r.num_tokens
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    for queue in (scheduler.waiting, scheduler.running):
        assert [r.arrival_index for r in queue] == sorted(r.arrival_index for r in queue)
    assert {r.request_id for r in scheduler.waiting + scheduler.running} == set(scheduler.requests)
    assert len(scheduler.waiting) + len(scheduler.running) == len(scheduler.requests)


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
    assert h.finals["a"].finish_reason == LENGTH
    assert h.tokens["a"] == reference_output(prompt, sampling(max_tokens=4, ignore_eos=True), 1024)[0]
    assert h.step() is None
    assert h.scheduler.stats().num_steps == 4


def test_chunked_prefill_of_a_prompt_many_times_the_budget() -> None:
    h = Harness(num_blocks=32, block_size=4, max_num_batched_tokens=8)
    prompt = [(3 * i) % VOCAB for i in range(50)]
    params = sampling(max_tokens=3, ignore_eos=True)
    h.add("long", prompt, params)
    chunk_sizes = []
    while (outputs := h.step()) == []:
        chunk_sizes.append(h.steps[-1].scheduled[0].num_new_tokens)
    chunk_sizes.append(h.steps[-1].scheduled[0].num_new_tokens)
    assert chunk_sizes == [8] * 6 + [2]
    assert [len(s.new_sequences) for s in h.steps] == [1] + [0] * 6
    assert [len(s.scheduled[0].new_block_ids) for s in h.steps] == [2] * 6 + [1]
    h.drain()
    assert h.tokens["long"] == reference_output(prompt, params, 1024)[0]


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
    assert sorted(h.finals) == [f"r{i}" for i in range(5)]


# --- stop conditions ---------------------------------------------------------------------


def scripted(tokens: list[int]) -> Callable[[Sequence[int]], int]:
    """Samples tokens[k] as the k-th generated token of any 3-token prompt."""
    return lambda context: tokens[len(context) - 3]


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
    assert h.tokens["a"] == expected_tokens
    assert h.finals["a"].finish_reason == expected_reason
    assert h.finals["a"].num_prompt_tokens == 3
    assert h.finals["a"].num_output_tokens == len(expected_tokens)


def test_final_output_converts_to_a_submit_response() -> None:
    out = RequestOutput("a", [4], LENGTH, num_prompt_tokens=3, num_output_tokens=2)
    response = out.to_proto()
    assert list(response.token_ids) == [4] and response.finish_reason == LENGTH
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3, 2)
    running = RequestOutput("a", [4], common_pb2.FINISH_REASON_UNSPECIFIED, 3, 1).to_proto()
    assert not running.HasField("usage") and not running.finish_reason


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
    short_model = Scheduler(SchedulerConfig(), 100, 2, 5, EOS_TOKEN_IDS)
    with pytest.raises(ValueError):
        short_model.add_request("a", list(range(5)), sampling())


# --- aborts --------------------------------------------------------------------------------


def test_abort_a_waiting_request() -> None:
    h = Harness(num_blocks=16, block_size=2, max_num_seqs=1)
    h.add("a", [2, 3], sampling(max_tokens=3, ignore_eos=True))
    h.add("b", [4, 5], sampling(max_tokens=3, ignore_eos=True))
    h.step()
    out = h.abort("b")
    assert out is not None and out.finished and out.finish_reason == ABORT and out.new_token_ids == []
    assert h.abort("b") is None and h.abort("nobody") is None
    h.drain()
    assert all(not s.finished_seq_ids or list(s.finished_seq_ids) == [1] for s in h.steps)


def test_abort_a_running_request_frees_its_blocks_now() -> None:
    h = Harness(num_blocks=16, block_size=2)
    h.add("a", [2, 3, 4], sampling(max_tokens=9, ignore_eos=True))
    h.add("b", [4, 5], sampling(max_tokens=3, ignore_eos=True))
    h.step()
    free_before = h.scheduler.block_manager.num_free_blocks
    out = h.abort("a")
    assert out is not None and out.finish_reason == ABORT and out.num_output_tokens == 1
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
    assert len(h.tokens["a"]) == 2


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
    h.worker, h.in_flight = FakeWorker(6, 2), None
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
    tokens_before = list(h.tokens["new"])
    h.drain()
    readmission = next(n for s in h.steps for n in s.new_sequences if n.seq_id > 2)
    assert list(readmission.token_ids) == [5, 6] + tokens_before
    assert readmission.num_computed_tokens == 0
    for request_id, prompt in (("old", [2, 3, 4]), ("new", [5, 6])):
        assert h.tokens[request_id] == reference_output(prompt, params, 8)[0]


def test_a_sequence_never_outgrows_the_pool_when_alone() -> None:
    h = Harness(num_blocks=3, block_size=2)
    h.add("a", [2, 3], sampling(ignore_eos=True))
    h.drain()
    assert h.finals["a"].finish_reason == LENGTH and len(h.tokens["a"]) == 4
    assert h.scheduler.stats().num_preemptions == 0


# --- protocol misuse ----------------------------------------------------------------------


def test_one_step_in_flight_and_results_must_match_it() -> None:
    h = Harness(num_blocks=8, block_size=2)
    h.add("a", [2, 3], sampling(max_tokens=4, ignore_eos=True))
    scheduled = h.schedule()
    assert scheduled is not None
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


def test_nothing_to_run_gives_no_step() -> None:
    h = Harness(num_blocks=8, block_size=2)
    assert h.scheduler.schedule() is None
    assert not h.scheduler.has_unfinished_requests()
    h.add("a", [2], sampling(max_tokens=1))
    assert h.scheduler.has_unfinished_requests()
    h.drain()
    stats = h.scheduler.stats()
    assert (stats.num_steps, stats.num_total_blocks, stats.num_free_blocks) == (1, 8, 8)


# --- random workloads ----------------------------------------------------------------------


@dataclass
class Workload:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    ops: list[tuple]


@st.composite
def workloads(draw: st.DrawFn, tight_pool: bool) -> Workload:
    # A tight pool with long-running requests forces preemption most of the time.
    if tight_pool:
        num_blocks, block_size = draw(st.integers(2, 6)), draw(st.integers(1, 2))
    else:
        num_blocks, block_size = draw(st.integers(2, 12)), draw(st.integers(1, 4))
    max_model_len = draw(st.integers(4, 40))
    usable_len = min(max_model_len, num_blocks * block_size)
    # Prompts up to usable_len, so that now and then one is one token too long.
    add_op = st.tuples(
        st.just("add"),
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=usable_len),
        st.none() if tight_pool else st.one_of(st.none(), st.integers(1, 12)),
        st.just(True) if tight_pool else st.booleans(),
        st.just([]) if tight_pool else st.lists(st.integers(2, 6), max_size=2),
    )
    step_op = st.tuples(st.just("step"), st.integers(1, 3))
    abort_op = st.tuples(st.sampled_from(["abort", "abort_during_step"]), st.integers(0, 8))
    any_op = st.one_of(add_op, add_op, add_op, step_op, step_op, abort_op)
    ops = draw(st.lists(any_op, min_size=6, max_size=40))
    return Workload(
        num_blocks, block_size, max_num_seqs=draw(st.integers(2 if tight_pool else 1, 4)),
        max_num_batched_tokens=draw(st.integers(1, 16)), max_model_len=max_model_len, ops=ops,
    )


@settings(max_examples=200, deadline=None)
@given(workload=st.one_of(workloads(tight_pool=False), workloads(tight_pool=True)))
def test_random_workloads_match_each_request_run_alone(workload: Workload) -> None:
    """Batching, chunking, preemption and aborts of others never change a request's tokens.
    Invariants are checked after every step and abort; see --hypothesis-show-statistics
    for how often each mechanism comes into play."""
    w = workload
    h = Harness(
        num_blocks=w.num_blocks, block_size=w.block_size, max_model_len=w.max_model_len,
        max_num_seqs=w.max_num_seqs, max_num_batched_tokens=w.max_num_batched_tokens,
    )
    usable_len = min(w.max_model_len, w.num_blocks * w.block_size)
    requests: dict[str, tuple[list[int], common_pb2.SamplingParams]] = {}
    aborted: set[str] = set()
    for op in w.ops:
        if op[0] == "add":
            _, prompt, max_tokens, ignore_eos, stop_token_ids = op
            request_id, params = f"r{len(requests)}", sampling(max_tokens, ignore_eos, stop_token_ids)
            if len(prompt) + 1 > usable_len:
                with pytest.raises(ValueError):
                    h.add(request_id, prompt, params)
                continue
            h.add(request_id, prompt, params)
            requests[request_id] = (prompt, params)
        elif op[0] == "step":
            for _ in range(op[1]):
                h.step()
        else:
            request_id = f"r{op[1]}"
            scheduled = h.schedule() if op[0] == "abort_during_step" else None
            in_flight = request_id in h.scheduler.requests
            assert (h.abort(request_id) is not None) == in_flight
            if in_flight:
                aborted.add(request_id)
            if scheduled is not None:
                h.finish_step(scheduled)
    h.drain()

    for request_id, (prompt, params) in requests.items():
        expected, reason = reference_output(prompt, params, usable_len)
        final = h.finals[request_id]
        if request_id in aborted:
            assert final.finish_reason == ABORT
            assert h.tokens[request_id] == expected[: len(h.tokens[request_id])]
        else:
            assert (h.tokens[request_id], final.finish_reason) == (expected, reason)
    assert h.scheduler.stats().num_steps == len(h.steps)

    chunked = any(
        item.seq_id == new.seq_id and item.num_new_tokens < len(new.token_ids)
        for step in h.steps for new in step.new_sequences for item in step.scheduled
    )
    event(f"preempted: {h.scheduler.stats().num_preemptions > 0}")
    event(f"chunked prefill: {chunked}")
    event(f"aborted: {bool(aborted)}")
    event(f"requests: {min(len(requests), 5)}")
