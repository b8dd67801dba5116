"""The scheduler driven by the fake worker (tests/support/fake_worker.py), which runs
each step when the harness asks for its result or, with worker_runs_ahead, as soon as it
is sent; with overlap the harness keeps two steps in flight. After every step the harness
checks the scheduler's books against each other and against the steps in flight."""

from collections import Counter, deque
from collections.abc import Sequence

from pagedserve.v1 import common_pb2, worker_pb2

from services.common.block_hash import chained_hashes
from services.scheduler.block_manager import cdiv
from services.scheduler.config import PreemptionMode, SchedulerConfig
from services.scheduler.outputs import RequestOutput, SchedulerOutput
from services.scheduler.request import SequenceStatus
from services.scheduler.scheduler import Scheduler
from tests.support.fake_worker import EOS_TOKEN_IDS, FakeWorker, Sampler, hash_sampler

ABORT = common_pb2.FINISH_REASON_ABORT


def sampling(
    max_tokens: int | None = None,
    ignore_eos: bool = False,
    stop_token_ids: Sequence[int] = (),
    n: int | None = None,
) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(ignore_eos=ignore_eos, stop_token_ids=stop_token_ids)
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if n is not None:
        params.n = n
    return params


class Harness:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int = 1024,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        sampler: Sampler = hash_sampler,
        num_cpu_blocks: int = 0,
        enable_prefix_caching: bool = True,
        preemption_mode: str = "recompute",
        max_waiting_requests: int | None = None,
        overlap: bool = True,
        worker_runs_ahead: bool = False,
        max_steps_in_flight: int | None = None,
        admission_batch_tokens: int = SchedulerConfig.admission_batch_tokens,
        admission_max_delay_steps: int = SchedulerConfig.admission_max_delay_steps,
        max_prompt_tokens_with_decodes: int | None = None,
        prompt_tokens_per_decode: int = 0,
    ) -> None:
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            preemption_mode=PreemptionMode(preemption_mode),
            max_waiting_requests=max_waiting_requests,
            seed=0,
            max_steps_in_flight=max_steps_in_flight or (2 if overlap else 1),
            admission_batch_tokens=admission_batch_tokens,
            admission_max_delay_steps=admission_max_delay_steps,
            max_prompt_tokens_with_decodes=max_prompt_tokens_with_decodes,
            prompt_tokens_per_decode=prompt_tokens_per_decode,
        )
        self.worker_runs_ahead = worker_runs_ahead
        # Steps' entries computing a token whose sample was still in flight, and sampled
        # tokens dropped because a stop found one step late had ended their completion.
        self.num_ran_ahead = 0
        self.num_dropped_tokens = 0
        self.scheduler = Scheduler(
            self.config, num_blocks, block_size, max_model_len, EOS_TOKEN_IDS, num_cpu_blocks=num_cpu_blocks
        )
        self.worker = FakeWorker(num_blocks, block_size, num_cpu_blocks, sampler)
        # (request_id, index) -> tokens streamed so far / last output.
        self.tokens: dict[tuple[str, int], list[int]] = {}
        self.finals: dict[tuple[str, int], RequestOutput] = {}
        self.finished_requests: set[str] = set()
        self.steps: list[worker_pb2.StepRequest] = []
        self.in_flight: deque[SchedulerOutput] = deque()
        # step_id -> blocks its sequences' tables held when it was built.
        self.blocks_of_step: dict[int, set[int]] = {}

    def add(
        self, request_id: str, prompt: list[int], params: common_pb2.SamplingParams, priority: int = 0
    ) -> None:
        self.scheduler.add_request(request_id, prompt, params, priority)
        n = params.n if params.HasField("n") else 1
        for index in range(n):
            self.tokens[(request_id, index)] = []
            self.finals.pop((request_id, index), None)
        self.finished_requests.discard(request_id)

    def collect(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            key = (out.request_id, out.index)
            assert key not in self.finals, "output after the completion finished"
            assert out.request_id not in self.finished_requests, "output after the request finished"
            self.tokens[key].extend(out.new_token_ids)
            assert out.num_output_tokens == len(self.tokens[key])
            if out.finished:
                self.finals[key] = out
            if out.request_finished:
                self.finished_requests.add(out.request_id)
                assert all(self.finals.get((out.request_id, i)) for i in range(self.n_of(out.request_id)))

    def n_of(self, request_id: str) -> int:
        return sum(1 for rid, _ in self.tokens if rid == request_id)

    def check(self) -> None:
        check_invariants(self.scheduler, self.worker, self)

    def schedule(self) -> SchedulerOutput | None:
        """Plans and sends one step (another may be in flight)."""
        scheduled = self.scheduler.schedule()
        if scheduled is not None:
            assert 0 < scheduled.num_scheduled_tokens <= self.config.max_num_batched_tokens
            assert len(scheduled.scheduled) <= self.config.max_num_seqs
            check_writes_are_private(self.scheduler, scheduled)
            step = scheduled.to_proto()
            self.steps.append(step)
            self.in_flight.append(scheduled)
            self.blocks_of_step[scheduled.step_id] = {
                b for item in scheduled.scheduled for b in item.sequence.block_table
            }
            self.num_ran_ahead += sum(
                item.sequence.num_pending_samples > (1 if item.num_samples else 0)
                for item in scheduled.scheduled
            )
            self.worker.submit(step)
            if self.worker_runs_ahead:
                self.worker.run_submitted()
            self.check()
        return scheduled

    def finish_step(self, scheduled: SchedulerOutput | None = None) -> list[RequestOutput]:
        """Applies the result of the oldest step in flight (which must be `scheduled`, if
        given)."""
        oldest = self.in_flight[0]
        assert scheduled is None or scheduled is oldest
        result = self.worker.result(oldest.step_id)
        outputs = self.scheduler.update_from_output(oldest, result)
        self.num_dropped_tokens += len(result.token_ids) - sum(len(o.new_token_ids) for o in outputs)
        self.in_flight.popleft()
        del self.blocks_of_step[oldest.step_id]
        self.collect(outputs)
        self.check()
        return outputs

    def step(self) -> list[RequestOutput] | None:
        """One step at a time: plans a step and applies its result."""
        assert not self.in_flight, "steps are in flight: use pipeline_step"
        scheduled = self.schedule()
        return None if scheduled is None else self.finish_step(scheduled)

    def pipeline_step(self) -> list[RequestOutput] | None:
        """As the engine does: sends steps while fewer than the scheduler allows are in
        flight, then applies the oldest one's result. None when nothing was in flight."""
        while len(self.in_flight) < self.scheduler.max_steps_in_flight:
            if self.schedule() is None:
                break
        return self.finish_step() if self.in_flight else None

    def abort(self, request_id: str) -> list[RequestOutput] | None:
        outputs = self.scheduler.abort_request(request_id)
        if outputs is not None:
            self.collect(outputs)
        self.check()
        return outputs

    def preempt(self, which: int, mode: PreemptionMode) -> bool:
        """Preempts the running sequence at position `which` (modulo); False if none runs."""
        if not self.scheduler.running:
            return False
        self.scheduler.preempt(self.scheduler.running[which % len(self.scheduler.running)], mode)
        self.check()
        return True

    def drain(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if self.pipeline_step() is None:
                break
        scheduler = self.scheduler
        assert not scheduler.has_unfinished_requests()
        assert not (scheduler.running or scheduler.waiting or scheduler.swapped)
        assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks
        assert scheduler.cpu_pool.num_free_blocks == scheduler.cpu_pool.num_total_blocks


def check_writes_are_private(scheduler: Scheduler, scheduled: SchedulerOutput) -> None:
    """Every block a step writes is held by the writing sequence alone (checked as the
    step is built, when its tokens were just counted as computed)."""
    manager = scheduler.block_manager
    for item in scheduled.scheduled:
        sequence = item.sequence
        start = sequence.num_computed_tokens - item.num_new_tokens
        for block_index in range(
            start // manager.block_size, cdiv(start + item.num_new_tokens, manager.block_size)
        ):
            assert manager.ref_count(sequence.block_table[block_index]) == 1, "a shared block is written"


def check_invariants(
    scheduler: Scheduler, worker: FakeWorker | None = None, harness: "Harness | None" = None
) -> None:
    manager, cpu_pool = scheduler.block_manager, scheduler.cpu_pool
    block_size = manager.block_size

    # Device blocks: free exactly when no table holds them and no step in flight still
    # uses them; ref count = number of tables + holds kept for steps in flight.
    free = manager.free_block_ids
    holders = Counter(b for s in scheduler.running for b in s.block_table)
    holders.update(scheduler.in_flight.held_block_ids())
    assert len(free) == len(set(free))
    assert set(free).isdisjoint(holders)
    assert all(manager.ref_count(b) == holders[b] for b in range(manager.num_total_blocks))
    assert len(free) + len(holders) == manager.num_total_blocks
    for s in scheduler.running:
        assert len(s.block_table) == len(set(s.block_table))
    if harness is not None:
        assert len(harness.in_flight) == len(scheduler.in_flight) <= scheduler.max_steps_in_flight
        for step_id, blocks in harness.blocks_of_step.items():
            assert set(free).isdisjoint(blocks), f"a block step {step_id} uses is free while it runs"
        # A sequence expects one token per step in flight that samples for it.
        expected = Counter(
            id(item.sequence)
            for step in harness.in_flight
            for item in step.scheduled
            if item.num_samples and item.sequence.status is not SequenceStatus.FINISHED
        )
        for r in scheduler.requests.values():
            for s in r.sequences:
                assert s.num_pending_samples == expected[id(s)], "pending samples do not match the steps"

    # CPU blocks: each held by one swapped sequence, or free.
    cpu_held = [b for s in scheduler.swapped for b in s.cpu_block_table]
    cpu_free = cpu_pool.free_block_ids
    assert len(cpu_held) == len(set(cpu_held)) and set(cpu_held).isdisjoint(cpu_free)
    assert len(cpu_held) + len(cpu_free) == cpu_pool.num_total_blocks

    # The prefix cache: each hash names a full block whose KV was computed from exactly the
    # tokens that produce that hash, once the worker has run every step sent.
    if worker is not None and worker.caught_up:
        for block_hash, block_id in manager.cached_blocks.items():
            slots = worker.kv[block_id]
            assert all(slot is not None for slot in slots), f"cached block {block_id} is not full"
            last_position, context = slots[-1]
            assert (last_position + 1) % block_size == 0 and len(context) == last_position + 1
            assert chained_hashes(context, block_size)[-1] == block_hash, f"block {block_id} lost its tokens"

    for s in scheduler.waiting:
        assert s.status is SequenceStatus.WAITING
        assert (
            s.block_table == []
            and s.cpu_block_table == []
            and s.num_computed_tokens == 0
            and s.seq_id is None
        )
    for s in scheduler.swapped:
        assert s.status is SequenceStatus.SWAPPED and s.block_table == [] and s.seq_id is None
        assert len(s.cpu_block_table) == cdiv(s.num_computed_tokens, block_size)
    for s in scheduler.running:
        assert s.status is SequenceStatus.RUNNING and s.cpu_block_table == []
        # Tokens of the steps sent count as computed, and exactly their blocks are held.
        assert len(s.block_table) == cdiv(s.num_computed_tokens, block_size)
        assert s.num_computed_tokens < s.num_planned_tokens
    assert sum(s.num_seats for s in scheduler.running) <= scheduler.config.max_num_seqs
    for queue in (scheduler.waiting, scheduler.running, scheduler.swapped):
        assert [s.sort_key for s in queue] == sorted(s.sort_key for s in queue)

    # Every unfinished completion of a request in flight is in exactly one queue.
    queued = [s for queue in (scheduler.waiting, scheduler.running, scheduler.swapped) for s in queue]
    assert len(queued) == len(set(map(id, queued)))
    unfinished = [
        s for r in scheduler.requests.values() for s in r.sequences if s.status is not SequenceStatus.FINISHED
    ]
    assert set(map(id, unfinished)) == set(map(id, queued))
    assert all(not r.finished for r in scheduler.requests.values())
