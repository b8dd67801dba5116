"""Scheduling through the three services on CPU with the embedded model: prefix caching,
preemption by recompute and by swap, chunked prefill, n completions, priorities and
backpressure. Greedy outputs are compared with the same requests run alone on a stack
with prefix caching off and a roomy pool."""

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from tests.support.service_stack import Stack, service_stack

BLOCK_SIZE = 16

SYSTEM = (
    "You are a careful assistant for a library. You answer questions about opening hours, borrowing "
    "rules and events. Keep every answer short, friendly and factual; when you do not know, say so and "
    "suggest asking the front desk. The library opens at nine and closes at six on weekdays, and at four "
    "on Saturdays; it is closed on Sundays."
)
QUESTIONS = [
    "When do you open on Monday?",
    "Can I borrow ten books?",
    "Are you open on Sunday?",
    "Is there a reading club?",
    "How late can I come on Saturday?",
    "Do you lend films?",
    "Where do I return books after closing?",
    "Can children get a card?",
    "Is the wifi free?",
    "Do you have printers?",
    "Can I book a study room?",
    "Are dogs allowed inside?",
    "Do you sell old books?",
    "Who runs the events?",
    "Can I renew a loan online?",
    "Is parking free?",
]
LONG_TEXT = (
    "Paged attention stores the key and value vectors of every sequence in fixed-size blocks, so that "
    "memory is allocated on demand and shared between sequences. "
)
# Prompts for a pool too small to hold them all at once: each fits alone.
CROWD = [
    {"prompt": LONG_TEXT * 3 + "In short,"},
    {"prompt": "The history of the printing press begins"},
    {"prompt": "def merge_sort(items):\n    "},
    {"messages": [{"role": "user", "content": LONG_TEXT * 2 + "Explain this to a child."}]},
    {"prompt": "A list of ten fruits: apple, banana,"},
    {"messages": [{"role": "user", "content": "Write a short poem about autumn leaves."}]},
]
CROWD_MAX_TOKENS = 10
# Several times the small stack's token budget of 32.
LONG_PROMPT = {"prompt": LONG_TEXT * 5 + "To sum up,"}
SMALL_POOL_BLOCKS = "14"


def _greedy(spec: dict, max_tokens: int, request_id: str = "", **fields) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens)
    return generation_pb2.GenerateRequest(request_id=request_id, sampling=sampling, **spec, **fields)


def _chat(question: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}


def _run(
    stack: Stack, request: generation_pb2.GenerateRequest
) -> tuple[list[int], generation_pb2.GenerateResponse]:
    """Generated ids and the last message of a single-completion request."""
    responses = list(stack.generation.Generate(request, timeout=300))
    return [t for r in responses for t in r.token_ids], responses[-1]


def _run_all(stack: Stack, requests: list[generation_pb2.GenerateRequest]) -> list[tuple[list[int], object]]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: _run(stack, r), requests))


def _stats(stack: Stack) -> scheduler_pb2.SchedulerStats:
    return stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())


def _wait_until(stack: Stack, condition, timeout_s: float = 30.0) -> scheduler_pb2.SchedulerStats:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _stats(stack)
        if condition(stats):
            return stats
        assert time.monotonic() < deadline, f"not reached: {stats}"
        time.sleep(0.02)


def _prompt_ids(stack: Stack, spec: dict) -> list[int]:
    request = generation_pb2.TokenizeRequest(text=spec.get("prompt", ""), messages=spec.get("messages", []))
    return list(stack.generation.Tokenize(request).token_ids)


@pytest.fixture(scope="module")
def reference(embedded_model_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    """Prefix caching off, a roomy pool, the default budget: each request computed in full."""
    with service_stack(
        embedded_model_dir, tmp_path_factory.mktemp("reference"), scheduler_args=["--no-prefix-caching"]
    ) as running:
        yield running


@pytest.fixture(scope="module")
def crowd_alone(reference: Stack) -> list[list[int]]:
    """Greedy outputs of each crowded request run by itself."""
    return [_run(reference, _greedy(spec, CROWD_MAX_TOKENS))[0] for spec in CROWD + [LONG_PROMPT]]


# --- prefix caching ---------------------------------------------------------------------


def test_a_shared_system_prompt_is_computed_once(stack: Stack, reference: Stack) -> None:
    specs = [_chat(question) for question in QUESTIONS]
    prompts = [_prompt_ids(stack, spec) for spec in specs]
    shared = next(i for i, tokens in enumerate(zip(*prompts)) if len(set(tokens)) > 1)
    shared_full_blocks = shared // BLOCK_SIZE
    assert shared_full_blocks >= 4

    before = _stats(stack)
    first = _run(stack, _greedy(specs[0], 8))
    rest = _run_all(stack, [_greedy(spec, 8) for spec in specs[1:]])
    after = _stats(stack)
    outputs = [first] + rest
    assert all(last.usage.cached_tokens >= shared_full_blocks * BLOCK_SIZE for _, last in rest)
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 15 * shared_full_blocks * BLOCK_SIZE
    assert after.prefix_cache_queries - before.prefix_cache_queries == sum(map(len, prompts))

    expected = _run_all(reference, [_greedy(spec, 8) for spec in specs])
    assert [tokens for tokens, _ in outputs] == [tokens for tokens, _ in expected]
    assert all(last.usage.cached_tokens == 0 for _, last in expected)
    assert _stats(reference).prefix_cache_hits == 0


# --- a pool too small for the load --------------------------------------------------------


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_crowded_pool_preempts_without_changing_outputs(
    mode: str, embedded_model_dir: Path, crowd_alone: list[list[int]], tmp_path: Path
) -> None:
    scheduler_args = [
        "--num-kv-blocks",
        SMALL_POOL_BLOCKS,
        "--max-num-batched-tokens",
        "32",
        "--preemption-mode",
        mode,
    ]
    with service_stack(
        embedded_model_dir, tmp_path, worker_args=["--swap-space", "0.05"], scheduler_args=scheduler_args
    ) as small:
        # The longest prompt is several times the step's token budget: it is prefilled in
        # chunks while the others decode.
        assert len(_prompt_ids(small, LONG_PROMPT)) > 4 * 32
        results = _run_all(small, [_greedy(spec, CROWD_MAX_TOKENS) for spec in CROWD + [LONG_PROMPT]])
        assert [tokens for tokens, _ in results] == crowd_alone
        # Blocks come back once no step in flight uses them.
        stats = _wait_until(small, lambda s: s.num_free_blocks == s.num_total_blocks, timeout_s=10)
        assert stats.num_total_blocks == int(SMALL_POOL_BLOCKS)
        if mode == "swap":
            assert stats.num_preemptions_swap > 0 and stats.num_total_cpu_blocks > 0
        else:
            assert stats.num_preemptions_recompute > 0 and stats.num_preemptions_swap == 0
        assert stats.num_free_blocks == stats.num_total_blocks
        assert stats.num_free_cpu_blocks == stats.num_total_cpu_blocks
        assert stats.num_running == stats.num_waiting == stats.num_swapped == 0
        assert stats.num_generation_tokens == sum(len(tokens) for tokens, _ in results)

        # A request that could never fit the pool is refused, not left waiting.
        too_big = _greedy({"prompt": LONG_TEXT * 9}, 8)
        with pytest.raises(grpc.RpcError) as refused:
            list(small.generation.Generate(too_big, timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- n completions -----------------------------------------------------------------------------


def test_n_completions_share_the_prompts_blocks(stack: Stack) -> None:
    spec = {"prompt": LONG_TEXT * 2 + "Put differently,"}
    n, max_tokens = 4, 12
    num_prompt = len(_prompt_ids(stack, spec))
    assert num_prompt % BLOCK_SIZE
    sampling = common_pb2.SamplingParams(
        temperature=1.0, seed=1234, max_tokens=max_tokens, n=n, ignore_eos=True
    )
    request = generation_pb2.GenerateRequest(request_id="n4", sampling=sampling, **spec)

    idle = _stats(stack)
    assert idle.num_running == 0
    tokens: dict[int, list[int]] = {i: [] for i in range(n)}
    used_while_running = []
    for response in stack.generation.Generate(request, timeout=300):
        tokens[response.index].extend(response.token_ids)
        stats = _stats(stack)
        if stats.num_running:
            used_while_running.append(stats.num_total_blocks - stats.num_free_blocks)
    assert all(len(t) == max_tokens for t in tokens.values())
    assert len({tuple(t) for t in tokens.values()}) == n

    full_prompt_blocks = num_prompt // BLOCK_SIZE
    blocks_each = -(-(num_prompt + max_tokens) // BLOCK_SIZE)
    held_once = full_prompt_blocks + n * (blocks_each - full_prompt_blocks)
    assert used_while_running and max(used_while_running) <= held_once < n * blocks_each

    # The seed makes the four completions reproducible.
    again: dict[int, list[int]] = {i: [] for i in range(n)}
    for response in stack.generation.Generate(request, timeout=300):
        again[response.index].extend(response.token_ids)
    assert again == tokens


# --- priorities, backpressure and deadlines ----------------------------------------------------


@pytest.fixture(scope="module")
def one_seat(embedded_model_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    """One running request at a time, two waiting: a fourth is refused."""
    args = ["--max-num-seqs", "1", "--max-waiting-requests", "2"]
    with service_stack(
        embedded_model_dir, tmp_path_factory.mktemp("one_seat"), scheduler_args=args
    ) as running:
        yield running


def _long_request(request_id: str, max_tokens: int, priority: int = 0) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return generation_pb2.GenerateRequest(
        request_id=request_id, prompt="Count: 1, 2, 3,", sampling=sampling, priority=priority
    )


def test_past_the_queue_limit_requests_are_refused_at_once(one_seat: Stack) -> None:
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(_run, one_seat, _long_request("running", 40))
        _wait_until(one_seat, lambda s: s.num_running == 1)
        waiting = [pool.submit(_run, one_seat, _long_request(f"waiting-{i}", 4)) for i in range(2)]
        _wait_until(one_seat, lambda s: s.num_waiting == 2)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            list(one_seat.generation.Generate(_long_request("refused", 4), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 2.0
        assert len(running.result()[0]) == 40 and all(len(w.result()[0]) == 4 for w in waiting)
    _wait_until(one_seat, lambda s: s.num_running == s.num_waiting == 0)
    assert len(_run(one_seat, _long_request("after", 4))[0]) == 4


def test_priority_decides_who_runs_next(one_seat: Stack) -> None:
    finished: list[str] = []
    lock = threading.Lock()

    def run(request: generation_pb2.GenerateRequest) -> None:
        _run(one_seat, request)
        with lock:
            finished.append(request.request_id)

    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(run, _long_request("blocker", 30))
        _wait_until(one_seat, lambda s: s.num_running == 1)
        lazy = pool.submit(run, _long_request("lazy", 2, priority=5))
        _wait_until(one_seat, lambda s: s.num_waiting == 1)
        urgent = pool.submit(run, _long_request("urgent", 2, priority=0))
        _wait_until(one_seat, lambda s: s.num_waiting == 2)
        for future in (blocker, lazy, urgent):
            future.result()
    # The urgent request arrived last but runs before the lazy one.
    assert finished == ["blocker", "urgent", "lazy"]


def test_an_expired_deadline_aborts_the_request_and_frees_its_blocks(one_seat: Stack) -> None:
    with pytest.raises(grpc.RpcError) as expired:
        list(one_seat.generation.Generate(_long_request("slow", 2000), timeout=1.0))
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Its blocks come back once no step in flight uses them.
    _wait_until(
        one_seat,
        lambda s: s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks,
        timeout_s=10,
    )


def test_more_completions_than_seats_is_invalid(one_seat: Stack) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=2, n=2)
    with pytest.raises(grpc.RpcError) as refused:
        list(
            one_seat.generation.Generate(
                generation_pb2.GenerateRequest(prompt="Hi", sampling=sampling), timeout=30
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.n" in refused.value.details()
