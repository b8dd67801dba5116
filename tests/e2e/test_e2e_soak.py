"""Clients that misbehave, then a soak of mixed requests on one stack.

Clients that leave mid-stream, or open a stream and never read it, free every block they
held and make no service log an error; an expired deadline is counted as
DEADLINE_EXCEEDED. The soak runs mixed requests (text, chat and token-id prompts, n > 1,
sampled and greedy, cancelled early, expired deadlines, streams left unread, bad input,
Tokenize and Detokenize) from several clients, then checks: every request completed or
ended with an explicit status, no block in use, no error logged, and each service's RSS
flat after the warm-up. Its figures are printed (benchmarks/RESULTS.md records them)."""

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2

from services.launcher import free_port
from tests.support.service_stack import Stack, service_stack

SOAK_S = 75.0
WARMUP_S = 20.0
CLIENTS = 6
# What the RSS of a service may grow by from the end of the warm-up to the end.
MAX_GROWTH_MB = 48.0
CALL_TIMEOUT_S = 300.0
# A cancelled request's blocks are freed once the steps in flight that use them return:
# well within a second on an idle machine, a few steps' time on a busy one.
IDLE_WITHIN_S = 30.0
# Statuses the soak's requests may end with: each says what happened.
EXPLICIT = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
SERVICES = ("tokenizer", "scheduler", "worker")


@pytest.fixture(scope="module")
def soak_stack(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Stack, int]:
    """The stack and its metrics base port: the tokenizer's /metrics there, the
    scheduler's on the next port, the worker's on the one after."""
    metrics_port = free_port()
    with service_stack(
        embedded_model_dir,
        tmp_path_factory.mktemp("soak"),
        worker_args=["--max-model-len", "512"],
        serve_flags=["--metrics-port", str(metrics_port)],
    ) as running:
        yield running, metrics_port


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _handled(metrics_port: int, method: str, code: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    line = f'pagedserve:grpc_server_handled_total{{code="{code}",method="{method}"}}'
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def _wait_for_handled(metrics_port: int, method: str, code: str, count: float) -> None:
    """The count is taken as the handler's generator closes, which for a cancelled
    stream may come a moment after its blocks are back."""
    deadline = time.monotonic() + 10.0
    while (seen := _handled(metrics_port, method, code)) != count:
        assert time.monotonic() < deadline, f"{method} {code}: {seen} calls counted, not {count}"
        time.sleep(0.05)


def _wait_until_idle(stack: Stack, within_s: float) -> scheduler_pb2.SchedulerStats:
    deadline = time.monotonic() + within_s
    while True:
        stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
        idle = (stats.num_running, stats.num_waiting, stats.num_swapped) == (0, 0, 0)
        if idle and stats.num_free_blocks == stats.num_total_blocks:
            return stats
        assert time.monotonic() < deadline, f"blocks still in use {within_s}s after the clients left: {stats}"
        time.sleep(0.05)


def _errors_logged(stack: Stack) -> list[str]:
    return [
        f"{name}: {line}"
        for name in SERVICES
        for line in (stack.log_dir / f"{name}.log").read_text().splitlines()
        if "ERROR" in line or "Traceback" in line
    ]


def _long_request(prompt: str = "Tell me a long story.") -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    return generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling)


def test_a_client_that_leaves_mid_stream_frees_its_blocks(soak_stack: tuple[Stack, int]) -> None:
    stack, metrics_port = soak_stack
    cancelled_before = _handled(metrics_port, "Generate", "CANCELLED")
    stream = stack.generation.Generate(_long_request(), timeout=CALL_TIMEOUT_S)
    for _ in range(3):
        next(stream)
    stream.cancel()
    _wait_until_idle(stack, within_s=IDLE_WITHIN_S)
    _wait_for_handled(metrics_port, "Generate", "CANCELLED", cancelled_before + 1)
    assert _errors_logged(stack) == []


def test_a_client_that_never_reads_its_stream_holds_nothing_after_it_leaves(
    soak_stack: tuple[Stack, int],
) -> None:
    stack, _ = soak_stack
    with grpc.insecure_channel(stack.public_address) as channel:
        unread = generation_pb2_grpc.GenerationStub(channel).Generate(_long_request(), timeout=CALL_TIMEOUT_S)
        # Others are served meanwhile.
        quick = generation_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=4))
        assert list(stack.generation.Generate(quick, timeout=CALL_TIMEOUT_S))[-1].usage.completion_tokens == 4
        assert unread.running()
    _wait_until_idle(stack, within_s=IDLE_WITHIN_S)
    assert _errors_logged(stack) == []


def test_an_expired_deadline_is_counted_as_deadline_exceeded(soak_stack: tuple[Stack, int]) -> None:
    stack, metrics_port = soak_stack
    before = _handled(metrics_port, "Generate", "DEADLINE_EXCEEDED")
    with pytest.raises(grpc.RpcError) as expired:
        list(stack.generation.Generate(_long_request(), timeout=1.0))
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_until_idle(stack, within_s=IDLE_WITHIN_S)
    _wait_for_handled(metrics_port, "Generate", "DEADLINE_EXCEEDED", before + 1)
    assert _errors_logged(stack) == []


class SoakClient:
    """One client's loop of requests of every kind, picked at random, until the end."""

    def __init__(self, stack: Stack, seed: int, end: float) -> None:
        self._stack = stack
        self._random = random.Random(seed)
        self._end = end
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._kinds: dict[str, Callable[[], None]] = {
            "text": self._text,
            "chat": self._chat,
            "token_ids": self._token_ids,
            "cancelled": self._cancelled,
            "deadline": self._deadline,
            "unread": self._unread,
            "bad_input": self._bad_input,
            "tokenize": self._tokenize,
        }

    def run(self) -> None:
        while time.monotonic() < self._end:
            kind = self._random.choice(list(self._kinds))
            try:
                self._kinds[kind]()
                status = "OK"
            except grpc.RpcError as error:
                status = error.code().name
            self.outcomes[kind, status] += 1

    def _sampling(self) -> common_pb2.SamplingParams:
        sampling = common_pb2.SamplingParams(
            max_tokens=self._random.randint(1, 32), seed=self._random.randint(0, 99)
        )
        sampling.temperature = self._random.choice([0.0, 0.8])
        sampling.n = self._random.choice([1, 1, 1, 2])
        return sampling

    def _generate(self, request: generation_pb2.GenerateRequest) -> None:
        list(self._stack.generation.Generate(request, timeout=CALL_TIMEOUT_S))

    def _text(self) -> None:
        prompt = " ".join(self._random.choice(["the", "cat", "sat", "on", "a", "mat"]) for _ in range(20))
        self._generate(generation_pb2.GenerateRequest(prompt=prompt, sampling=self._sampling()))

    def _chat(self) -> None:
        message = generation_pb2.ChatMessage(
            role="user", content=f"Name a number above {self._random.randint(0, 99)}."
        )
        self._generate(generation_pb2.GenerateRequest(messages=[message], sampling=self._sampling()))

    def _token_ids(self) -> None:
        ids = [self._random.randint(100, 40000) for _ in range(self._random.randint(1, 200))]
        self._generate(generation_pb2.GenerateRequest(prompt_token_ids=ids, sampling=self._sampling()))

    def _cancelled(self) -> None:
        stream = self._stack.generation.Generate(_long_request(), timeout=CALL_TIMEOUT_S)
        for _ in range(self._random.randint(1, 4)):
            next(stream)
        stream.cancel()
        list(stream)

    def _deadline(self) -> None:
        list(self._stack.generation.Generate(_long_request(), timeout=self._random.uniform(0.2, 1.5)))

    def _unread(self) -> None:
        stream = self._stack.generation.Generate(_long_request(), timeout=CALL_TIMEOUT_S)
        time.sleep(self._random.uniform(0.1, 1.0))
        stream.cancel()
        list(stream)

    def _bad_input(self) -> None:
        sampling = common_pb2.SamplingParams(temperature=float("nan"))
        self._generate(generation_pb2.GenerateRequest(prompt="Hi", sampling=sampling))

    def _tokenize(self) -> None:
        ids = self._stack.generation.Tokenize(generation_pb2.TokenizeRequest(text="A short text to count."))
        self._stack.generation.Detokenize(generation_pb2.DetokenizeRequest(token_ids=ids.token_ids))


def _rss_of(stack: Stack) -> dict[str, float]:
    return {name: _rss_mb(stack.processes[name].pid) for name in SERVICES}


def test_soak_of_mixed_requests(soak_stack: tuple[Stack, int]) -> None:
    stack, _ = soak_stack
    rss_start = _rss_of(stack)
    started = time.monotonic()
    clients = [SoakClient(stack, seed, started + SOAK_S) for seed in range(CLIENTS)]
    threads = [threading.Thread(target=client.run) for client in clients]
    for thread in threads:
        thread.start()
    time.sleep(WARMUP_S)
    rss_warm = _rss_of(stack)
    for thread in threads:
        thread.join()
    duration_s = time.monotonic() - started
    stats = _wait_until_idle(stack, within_s=IDLE_WITHIN_S)
    rss_end = _rss_of(stack)
    outcomes: Counter[tuple[str, str]] = sum((client.outcomes for client in clients), Counter())
    by_status: Counter[str] = Counter()
    for (_, status), count in outcomes.items():
        by_status[status] += count
    print(f"\nsoak: {sum(outcomes.values())} requests from {CLIENTS} clients in {duration_s:.0f}s")
    print(f"outcomes by status: {dict(sorted(by_status.items()))}")
    print(f"outcomes by kind: {dict(sorted(outcomes.items()))}")
    for name in SERVICES:
        print(
            f"{name} RSS MB: start {rss_start[name]:.0f}, after {WARMUP_S:.0f}s warm-up "
            f"{rss_warm[name]:.0f}, end {rss_end[name]:.0f}"
        )
    print(
        f"blocks in use at the end: {stats.num_total_blocks - stats.num_free_blocks} of {stats.num_total_blocks}"
    )
    assert set(by_status) <= EXPLICIT, by_status
    # Deadlines expire only where they are short, bad input only where it is bad.
    assert {kind for (kind, status) in outcomes if status == "DEADLINE_EXCEEDED"} <= {"deadline"}
    assert all(status == "INVALID_ARGUMENT" for (kind, status) in outcomes if kind == "bad_input")
    assert by_status["OK"] >= len(threads)
    assert _errors_logged(stack) == []
    for name in SERVICES:
        growth = rss_end[name] - rss_warm[name]
        assert growth <= MAX_GROWTH_MB, f"{name} grew by {growth:.0f} MB after the warm-up"
    assert all(process.poll() is None for process in stack.processes.values())
