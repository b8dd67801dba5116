"""Random workloads through the scheduler and the fake worker: adds (some sharing prompt
prefixes, some with n completions and priorities), steps, aborts (between steps and while
steps run) and forced preemptions in both modes, on pools from roomy to tight; one step
at a time, or overlapped with two or three steps in flight (then every operation may land
while steps run), with the fake worker running each step as late as possible or at once.

After every operation the harness checks the books (tests/support/scheduler_harness.py,
check_invariants): no block both free and held; each device block's ref count equals the
number of block tables holding it plus the holds kept for steps in flight (the prefix cache
holds none); no block a step in flight uses is free; each sequence expects exactly one
token per step in flight that samples for it; each CPU block held by at most one swapped
sequence; every cached hash names a full block whose KV was computed from exactly the
tokens that produce the hash; a block a step writes is held by its writer alone; every
unfinished completion in exactly one queue, queues in scheduling order. When the work
drains, every block is free again. And whatever happened to a completion on the way
(batching, chunking, cache hits, forks, preemption by recompute or swap, running a step
ahead of its sample, a stop found one step late), its tokens equal those it yields run
alone."""

from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pagedserve.v1 import common_pb2

from services.scheduler.config import PreemptionMode
from tests.support.fake_worker import VOCAB, reference_output
from tests.support.scheduler_harness import ABORT, Harness, sampling


@dataclass
class Workload:
    num_blocks: int
    block_size: int
    num_cpu_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    preemption_mode: str
    enable_prefix_caching: bool
    shared_prefix: list[int]
    ops: list[tuple]
    max_steps_in_flight: int
    worker_runs_ahead: bool
    max_prompt_tokens_with_decodes: int | None


@st.composite
def workloads(draw: st.DrawFn, tight_pool: bool) -> Workload:
    # A tight pool with long-running requests forces preemption most of the time.
    if tight_pool:
        num_blocks, block_size = draw(st.integers(2, 6)), draw(st.integers(1, 2))
    else:
        num_blocks, block_size = draw(st.integers(2, 12)), draw(st.integers(1, 4))
    max_model_len = draw(st.integers(4, 40))
    usable_len = min(max_model_len, num_blocks * block_size)
    tokens = st.integers(0, VOCAB - 1)
    # Prompts up to usable_len, so that now and then one is one token too long; many start
    # with (part of) a prefix they share, for the prefix cache to find.
    add_op = st.tuples(
        st.just("add"),
        st.integers(0, usable_len),  # length of the shared prefix taken
        st.lists(tokens, min_size=0, max_size=max(1, usable_len // 2)),
        st.none() if tight_pool else st.one_of(st.none(), st.integers(1, 12)),
        st.just(True) if tight_pool else st.booleans(),
        st.just([]) if tight_pool else st.lists(st.integers(2, 6), max_size=2),
        st.sampled_from([None, None, 1, 2, 3]),  # n
        st.integers(0, 2),  # priority
    )
    step_op = st.tuples(st.just("step"), st.integers(1, 3))
    abort_op = st.tuples(st.sampled_from(["abort", "abort_during_step"]), st.integers(0, 8))
    preempt_op = st.tuples(st.just("preempt"), st.integers(0, 7), st.sampled_from(list(PreemptionMode)))
    any_op = st.one_of(add_op, add_op, step_op, step_op, abort_op, preempt_op)
    return Workload(
        num_blocks,
        block_size,
        num_cpu_blocks=draw(st.integers(0, 8)),
        max_num_seqs=draw(st.integers(2 if tight_pool else 1, 4)),
        max_num_batched_tokens=draw(st.integers(1, 16)),
        max_model_len=max_model_len,
        preemption_mode=draw(st.sampled_from(["recompute", "swap"])),
        enable_prefix_caching=draw(st.booleans()),
        shared_prefix=draw(st.lists(tokens, min_size=usable_len, max_size=usable_len)),
        ops=draw(st.lists(any_op, min_size=10, max_size=50)),
        max_steps_in_flight=draw(st.sampled_from([1, 2, 2, 3])),
        worker_runs_ahead=draw(st.booleans()),
        max_prompt_tokens_with_decodes=draw(st.sampled_from([None, None, 1, 2, 5])),
    )


def _is_valid(
    prompt: list[int], params: common_pb2.SamplingParams, usable_len: int, max_num_seqs: int
) -> bool:
    if not prompt or len(prompt) + 1 > usable_len:
        return False
    if params.HasField("max_tokens") and len(prompt) + params.max_tokens > usable_len:
        return False
    return not params.HasField("n") or params.n <= max_num_seqs


@settings(max_examples=400, deadline=None)
@given(workload=st.one_of(workloads(tight_pool=False), workloads(tight_pool=True)))
def test_random_workloads_keep_the_books_and_match_each_completion_run_alone(workload: Workload) -> None:
    w = workload
    h = Harness(
        num_blocks=w.num_blocks,
        block_size=w.block_size,
        max_model_len=w.max_model_len,
        max_num_seqs=w.max_num_seqs,
        max_num_batched_tokens=w.max_num_batched_tokens,
        num_cpu_blocks=w.num_cpu_blocks,
        preemption_mode=w.preemption_mode,
        enable_prefix_caching=w.enable_prefix_caching,
        max_steps_in_flight=w.max_steps_in_flight,
        worker_runs_ahead=w.worker_runs_ahead,
        max_prompt_tokens_with_decodes=w.max_prompt_tokens_with_decodes,
    )
    usable_len = min(w.max_model_len, w.num_blocks * w.block_size)
    requests: dict[str, tuple[list[int], common_pb2.SamplingParams]] = {}
    aborted: set[str] = set()
    forced_preemptions = 0
    for op in w.ops:
        if op[0] == "add":
            _, num_shared, own_tokens, max_tokens, ignore_eos, stop_token_ids, n, priority = op
            prompt = (w.shared_prefix[:num_shared] + own_tokens)[:usable_len]
            request_id, params = f"r{len(requests)}", sampling(max_tokens, ignore_eos, stop_token_ids, n)
            if not _is_valid(prompt, params, usable_len, w.max_num_seqs):
                with pytest.raises(ValueError):
                    h.add(request_id, prompt, params, priority)
                continue
            h.add(request_id, prompt, params, priority)
            requests[request_id] = (prompt, params)
        elif op[0] == "step":
            for _ in range(op[1]):
                h.pipeline_step() if w.max_steps_in_flight > 1 else h.step()
        elif op[0] == "preempt":
            forced_preemptions += h.preempt(op[1], op[2])
        else:
            request_id = f"r{op[1]}"
            scheduled = None
            if op[0] == "abort_during_step" and len(h.in_flight) < h.scheduler.max_steps_in_flight:
                scheduled = h.schedule()
            unfinished = request_id in h.scheduler.requests
            assert (h.abort(request_id) is not None) == unfinished
            if unfinished:
                aborted.add(request_id)
            # One step at a time: its result comes back before anything else happens.
            if scheduled is not None and w.max_steps_in_flight == 1:
                h.finish_step(scheduled)
    h.drain()

    for request_id, (prompt, params) in requests.items():
        n = params.n if params.HasField("n") else 1
        assert request_id in h.finished_requests
        for index in range(n):
            expected, reason = reference_output(prompt, params, usable_len, index=index)
            final, tokens = h.finals[request_id, index], h.tokens[request_id, index]
            if request_id in aborted and final.finish_reason == ABORT:
                assert tokens == expected[: len(tokens)]
            else:
                assert (tokens, final.finish_reason) == (expected, reason)
    stats = h.scheduler.stats()
    assert stats.num_steps == len(h.steps)
    assert stats.num_preemptions >= forced_preemptions

    new_sequences = [new for step in h.steps for new in step.new_sequences]
    chunked = any(
        item.seq_id == new.seq_id and new.num_computed_tokens + item.num_new_tokens < len(new.token_ids)
        for step in h.steps
        for new in step.new_sequences
        for item in step.scheduled
    )
    event(f"preempted by recompute: {stats.num_preemptions_recompute > 0}")
    event(f"swapped: {stats.num_preemptions_swap > 0}")
    event(f"prefix cache hit: {stats.prefix_cache_hits > 0}")
    event(f"forked: {any(new.index > 0 for new in new_sequences)}")
    event(f"copied on write: {any(step.copy_blocks for step in h.steps)}")
    event(f"chunked prefill: {chunked}")
    event(f"aborted: {bool(aborted)}")
    event(f"steps in flight: {w.max_steps_in_flight}")
    event(f"ran ahead of a sample: {h.num_ran_ahead > 0}")
    event(f"dropped a token sampled after a stop: {h.num_dropped_tokens > 0}")
