"""A scheduler process started against a real worker process built for small steps: it
adopts the worker's limits, and refuses to start when told to schedule larger steps."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from services.launcher import free_port, loopback_service_commands, running_services

WORKER_MAX_NUM_SEQS = 4
WORKER_MAX_NUM_BATCHED_TOKENS = 64


def _command(service: str, model_dir: Path, ports: dict[str, int], *flags: str) -> list[str]:
    """The command line `pagedserve serve` would run for `service` on loopback, with the
    worker built for small steps, then `flags`."""
    serve_flags = ["--device", "cpu", "--num-kv-blocks", "64", "--swap-space", "0"]
    serve_flags += ["--max-num-seqs", str(WORKER_MAX_NUM_SEQS)]
    serve_flags += ["--max-num-batched-tokens", str(WORKER_MAX_NUM_BATCHED_TOKENS)]
    return [*loopback_service_commands(model_dir, ports, serve_flags)[service], *flags]


@pytest.fixture(scope="module")
def worker_port(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    ports = {"worker": free_port(), "scheduler": 0, "tokenizer": 0}
    command = _command("worker", embedded_model_dir, ports)
    log_dir = tmp_path_factory.mktemp("small_steps_worker")
    address = f"127.0.0.1:{ports['worker']}"
    with running_services({"worker": command}, {"worker": address}, log_dir, startup_timeout_s=180):
        yield ports["worker"]


def _scheduler_command(model_dir: Path, worker_port: int, port: int, *flags: str) -> list[str]:
    return _command(
        "scheduler", model_dir, {"worker": worker_port, "scheduler": port, "tokenizer": 0}, *flags
    )


@pytest.mark.parametrize(
    ("flag", "asked", "built", "setting"),
    [
        ("--max-num-seqs", 8, WORKER_MAX_NUM_SEQS, "max_num_seqs"),
        ("--max-num-batched-tokens", 128, WORKER_MAX_NUM_BATCHED_TOKENS, "max_num_batched_tokens"),
    ],
)
def test_a_scheduler_asked_for_more_than_the_worker_can_do_refuses_to_start(
    embedded_model_dir: Path, worker_port: int, flag: str, asked: int, built: int, setting: str
) -> None:
    command = _scheduler_command(embedded_model_dir, worker_port, free_port(), flag, str(asked))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    message = refused.stderr.strip().splitlines()[-1]
    assert f"{setting} {asked}" in message and f"the {built} the worker is built for" in message
    assert f"scheduler's {flag}" in message


def test_a_scheduler_told_nothing_adopts_the_workers_limits(
    embedded_model_dir: Path, worker_port: int, tmp_path: Path
) -> None:
    port = free_port()
    command = _scheduler_command(embedded_model_dir, worker_port, port)
    address = f"127.0.0.1:{port}"
    with (
        running_services({"scheduler": command}, {"scheduler": address}, tmp_path, startup_timeout_s=120),
        grpc.insecure_channel(address) as channel,
    ):
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
