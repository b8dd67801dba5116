"""A scheduler process started against a real worker process built for small steps: it
adopts the worker's limits, and refuses to start when told to schedule larger steps."""

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from services.launcher import free_port, wait_until_serving

CLI = [sys.executable, "-m", "services.cli", "--log-level", "WARNING"]
WORKER_MAX_NUM_SEQS = 4
WORKER_MAX_NUM_BATCHED_TOKENS = 64


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def worker_address(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("small_steps_worker")
    port = free_port()
    command = [
        *CLI,
        "worker",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--shutdown-grace",
        "1",
        "--model",
        str(embedded_model_dir),
        "--device",
        "cpu",
        "--num-kv-blocks",
        "64",
        "--swap-space",
        "0",
        "--max-num-seqs",
        str(WORKER_MAX_NUM_SEQS),
        "--max-num-batched-tokens",
        str(WORKER_MAX_NUM_BATCHED_TOKENS),
    ]
    with open(log_dir / "worker.log", "w") as log:
        worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        address = f"127.0.0.1:{port}"
        wait_until_serving({"worker": worker}, {"worker": address}, log_dir, timeout_s=180)
        yield address
    finally:
        _stop(worker)


def _scheduler_command(worker_address: str, port: int, *flags: str) -> list[str]:
    return [
        *CLI,
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--shutdown-grace",
        "1",
        "--worker",
        worker_address,
        *flags,
    ]


@pytest.mark.parametrize(
    ("flag", "asked", "built", "setting"),
    [
        ("--max-num-seqs", 8, WORKER_MAX_NUM_SEQS, "max_num_seqs"),
        ("--max-num-batched-tokens", 128, WORKER_MAX_NUM_BATCHED_TOKENS, "max_num_batched_tokens"),
    ],
)
def test_a_scheduler_asked_for_more_than_the_worker_can_do_refuses_to_start(
    worker_address: str, flag: str, asked: int, built: int, setting: str
) -> None:
    command = _scheduler_command(worker_address, free_port(), flag, str(asked))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    message = refused.stderr.strip().splitlines()[-1]
    assert f"{setting} {asked}" in message and f"the {built} the worker is built for" in message
    assert f"scheduler's {flag}" in message


def test_a_scheduler_told_nothing_adopts_the_workers_limits(worker_address: str, tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "scheduler.log", "w") as log:
        scheduler = subprocess.Popen(
            _scheduler_command(worker_address, port), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        address = f"127.0.0.1:{port}"
        wait_until_serving({"scheduler": scheduler}, {"scheduler": address}, tmp_path, timeout_s=120)
        with grpc.insecure_channel(address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)

            def submit(n: int) -> list[scheduler_pb2.SubmitResponse]:
                sampling = common_pb2.SamplingParams(temperature=0, max_tokens=2, n=n)
                request = scheduler_pb2.SubmitRequest(
                    request_id=f"n{n}", prompt_token_ids=[1, 2, 3], sampling=sampling
                )
                return list(stub.Submit(request, timeout=60))

            # A request's completions each take a seat: the worker's max_num_seqs is the limit.
            with pytest.raises(grpc.RpcError) as refused:
                submit(WORKER_MAX_NUM_SEQS + 1)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"[1, {WORKER_MAX_NUM_SEQS}]" in refused.value.details()
            finished = [r.index for r in submit(WORKER_MAX_NUM_SEQS) if r.finish_reason]
            assert sorted(finished) == list(range(WORKER_MAX_NUM_SEQS))
    finally:
        _stop(scheduler)
