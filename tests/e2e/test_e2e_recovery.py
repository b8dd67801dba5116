"""`pagedserve serve` survives its services' failures, on CPU with the embedded model:
8 concurrent greedy generations run while the worker is killed (SIGKILL), while the
scheduler is killed, and while either is stopped (SIGSTOP); every one completes with
the tokens of an undisturbed run, health says NOT_SERVING while the chain is broken and
SERVING again after, and nobody but serve itself restarts anything."""

import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from tests.support.serve_process import Served, running_serve, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_TOKENS = 24
WORKER_TIMEOUT_S = 2.0
HANG_TIMEOUT_S = 6.0
SCHEDULER_TIMEOUT_S = 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING
# The scheduler answers only callers with serve's internal token.
INTERNAL_TOKEN = "recovery-test-token"


@pytest.fixture(scope="module")
def served(embedded_model_dir: Path, tmp_path_factory) -> Iterator[Served]:
    flags = [
        *("--num-kv-blocks", "128"),
        *("--worker-timeout", str(WORKER_TIMEOUT_S), "--hang-timeout", str(HANG_TIMEOUT_S)),
        *("--scheduler-timeout", str(SCHEDULER_TIMEOUT_S)),
        *("--internal-token", INTERNAL_TOKEN),
    ]
    log_path = tmp_path_factory.mktemp("recovery") / "serve.log"
    with running_serve(embedded_model_dir, log_path, flags) as running:
        yield running


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == SERVING


def _requests() -> list[generation_pb2.GenerateRequest]:
    words = ["cat", "dog", "king", "river", "robot", "tree", "ship", "star"]
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [
        generation_pb2.GenerateRequest(prompt=f"Story {i}: once upon a time, a {word}", sampling=sampling)
        for i, word in enumerate(words)
    ]


def _generate(
    served: Served, request: generation_pb2.GenerateRequest, started: threading.Barrier | None
) -> list[int]:
    tokens: list[int] = []
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        for message in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=300):
            if started is not None and not tokens and message.token_ids:
                started.wait(timeout=120)
            tokens.extend(message.token_ids)
    return tokens


@pytest.fixture(scope="module")
def undisturbed(served: Served) -> list[list[int]]:
    with ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(lambda r: _generate(served, r, None), _requests()))
    assert all(len(t) == MAX_TOKENS for t in tokens)
    return tokens


def _disturbed_run(served: Served, disturb: Callable[[], None]) -> list[list[int]]:
    """The 8 requests again, `disturb` called once every stream has its first tokens."""
    requests = _requests()
    started = threading.Barrier(len(requests) + 1)
    with ThreadPoolExecutor(len(requests)) as pool:
        streams = [pool.submit(_generate, served, request, started) for request in requests]
        started.wait(timeout=120)
        disturb()
        return [stream.result() for stream in streams]


def _recovered(served: Served) -> None:
    wait_for(
        lambda: _serving(served.public_address) and _serving(served.address_of("scheduler")),
        120,
        "serving again",
    )


def _assert_recovered(
    served: Served, disturbed: list[list[int]], undisturbed: list[list[int]], service: str, reason: str
) -> None:
    """The disturbed streams got the tokens undisturbed ones did, the stack serves again, and
    serve restarted `service` once, for `reason` (exit or hang)."""
    assert disturbed == undisturbed
    _recovered(served)
    assert served.restarts(service, reason) == 1


def _assert_restarted_after_kill(served: Served, undisturbed: list[list[int]], service: str) -> None:
    pid = served.pid_of(service)
    disturbed = _disturbed_run(served, lambda: os.kill(pid, signal.SIGKILL))
    _assert_recovered(served, disturbed, undisturbed, service, "exit")
    assert served.pid_of(service) != pid


def _run_while_stopped(served: Served, pid: int, stop: Callable[[], None]) -> list[list[int]]:
    """The disturbed run with `stop` (which stops `pid`); `pid` runs on again whatever happens,
    so that a failed check leaves no stopped process behind."""
    try:
        return _disturbed_run(served, stop)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)


def test_a_killed_worker_is_restarted_and_its_requests_recomputed(
    served: Served, undisturbed: list[list[int]]
):
    _assert_restarted_after_kill(served, undisturbed, "worker")
    assert "wait to be recomputed" in served.log_path.read_text()
    assert served.scheduler_metric("pagedserve:worker_failures_total") == 1
    assert served.scheduler_metric("pagedserve:requests_recomputed_after_worker_failure_total") == 8


def test_a_killed_schedulers_requests_continue_on_the_restarted_one(
    served: Served, undisturbed: list[list[int]]
):
    _assert_restarted_after_kill(served, undisturbed, "scheduler")


def test_a_stopped_worker_is_declared_dead_within_the_timeout(served: Served, undisturbed: list[list[int]]):
    worker = served.pid_of("worker")
    scheduler_address = served.address_of("scheduler")
    observed: dict[str, float] = {}

    def stop_worker() -> None:
        os.kill(worker, signal.SIGSTOP)
        observed["not_serving_after_s"] = wait_for(
            lambda: not _serving(scheduler_address) and not _serving(served.public_address),
            WORKER_TIMEOUT_S + 5,
            "NOT_SERVING once the worker stopped answering",
        )
        with grpc.insecure_channel(scheduler_address) as channel:
            stats = scheduler_pb2_grpc.SchedulerStub(channel).GetStats(
                scheduler_pb2.GetStatsRequest(),
                timeout=5,
                metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),),
            )
        # Off the stopped worker: every request waits to be recomputed.
        observed["running"], observed["waiting"] = stats.num_running, stats.num_waiting

    disturbed = _run_while_stopped(served, worker, stop_worker)
    assert observed["not_serving_after_s"] < WORKER_TIMEOUT_S + 5
    assert (observed["running"], observed["waiting"]) == (0, 8)
    # Serve killed the stopped worker (its liveness check went unanswered) and started it again.
    _assert_recovered(served, disturbed, undisturbed, "worker", "hang")


def test_a_stopped_scheduler_is_noticed_and_restarted(served: Served, undisturbed: list[list[int]]):
    scheduler = served.pid_of("scheduler")
    observed: dict[str, float] = {}

    def stop_scheduler() -> None:
        os.kill(scheduler, signal.SIGSTOP)
        observed["not_serving_after_s"] = wait_for(
            lambda: not _serving(served.public_address),
            SCHEDULER_TIMEOUT_S + 5,
            "the tokenizer NOT_SERVING once its scheduler stopped answering",
        )

    disturbed = _run_while_stopped(served, scheduler, stop_scheduler)
    assert observed["not_serving_after_s"] < SCHEDULER_TIMEOUT_S + 5
    _assert_recovered(served, disturbed, undisturbed, "scheduler", "hang")
