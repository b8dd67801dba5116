"""A pretend device for measuring the services without one: a worker whose model takes,
per step, a fixed time plus a time per decoding sequence and per prompt token (by default
the H200's measured step times for the Qwen3-0.6B benchmark), queued one step after another
as on a GPU; launching a step holds the worker's GIL for a time per step and per sequence,
as the real worker's input building and kernel launches do. It samples a fixed token per
sequence.

    python -m benchmarks.pretend_device --port 50053 --costs step_base_ms=1.7,step_ms_per_seq=0.058

serves one such worker (benchmarks.service_overhead and benchmarks.serving start them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from pagedserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from gpu_worker.device_time import DECODE, PREFILL
from services.common.step_limits import StepLimits
from services.launcher import free_port
from services.serve_layout import worker_name

if TYPE_CHECKING:
    from gpu_worker.model_runner import ModelRunner


@dataclass(frozen=True)
class PretendCosts:
    # Device time of a step: fixed, per decoding sequence, per prompt token. Defaults: the
    # H200's decode steps (0.90 ms at 1 sequence, 2.63 at 64, 8.3 at 256) and its 0.37 s
    # of prefill device time over the workload's 142,827 prompt tokens.
    step_base_ms: float = 0.85
    step_ms_per_seq: float = 0.029
    step_us_per_prompt_token: float = 2.6
    # Host time launching a step holds the GIL: fixed and per sequence.
    launch_base_ms: float = 1.0
    launch_us_per_seq: float = 5.0

    def step_seconds(self, num_decodes: int, num_prompt_tokens: int) -> float:
        if not num_decodes + num_prompt_tokens:
            return 0.0
        return (
            self.step_base_ms / 1e3
            + self.step_ms_per_seq * num_decodes / 1e3
            + self.step_us_per_prompt_token * num_prompt_tokens / 1e6
        )

    @classmethod
    def parse(cls, text: str) -> PretendCosts:
        """From "name=value,..." (any of the fields; the others keep their defaults)."""
        pairs = [item.split("=", 1) for item in text.split(",") if item]
        return cls(**{name.strip().replace("-", "_"): float(value) for name, value in pairs})

    def text(self) -> str:
        """The form `parse` reads."""
        return ",".join(f"{name}={value}" for name, value in vars(self).items())

    def launch_seconds(self, num_seqs: int) -> float:
        return self.launch_base_ms / 1e3 + self.launch_us_per_seq * num_seqs / 1e6


class _PretendLaunch:
    def __init__(self, step_id: int, done_at: float, samples: list[tuple[int, int]]) -> None:
        self.step_id, self.done_at, self.samples = step_id, done_at, samples
        # Read by the step pipeline, as from the runner's launched steps.
        self.replayed_graph = False

    def wait(self) -> None:
        time.sleep(max(0.0, self.done_at - time.perf_counter()))


class _PretendDeviceTimer:
    """The device timer's interface (gpu_worker/device_time.py) over the pretend times."""

    def __init__(self) -> None:
        self.seconds = {DECODE: 0.0, PREFILL: 0.0}

    def resolve(self) -> None:
        pass


class _PretendObserver:
    """The step observer's readings (gpu_worker/step_observer.py): the pretend device
    times, and no step timeline."""

    timeline = None

    def __init__(self) -> None:
        self.device_timer = _PretendDeviceTimer()


class NullRunner:
    """Speaks the worker's step protocol and samples a fixed token per sequence; steps
    take the pretend device's time, one after another, as on a device."""

    step_graphs: tuple = ()

    def __init__(
        self,
        costs: PretendCosts,
        vocab_size: int = 49152,
        max_model_len: int = 4096,
        rank: int = 0,
        num_ranks: int = 1,
    ) -> None:
        """rank, num_ranks: a rank of a tensor-parallel engine, whose rank 0 reports the
        tokens (as a real engine's only stage does)."""
        self.costs = costs
        self.rank, self.num_ranks = rank, num_ranks
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.observer = _PretendObserver()
        # seq_id -> [tokens known or sampled, tokens computed]
        self.sequences: dict[int, list[int]] = {}
        self._device_free_at = 0.0

    def info(self) -> worker_pb2.WorkerInfo:
        model = common_pb2.ModelInfo(
            model_name="null",
            architecture="null",
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=[0],
        )
        # Built for the standard steps, as a worker started with no options.
        return worker_pb2.WorkerInfo(
            model=model,
            num_kv_blocks=1 << 20,
            block_size=16,
            device="none",
            dtype="none",
            **StepLimits().worker_info_fields(),
            rank=self.rank,
            tensor_parallel_size=self.num_ranks,
            pipeline_parallel_size=1,
            reports_tokens=self.rank == 0,
        )

    def reset(self) -> None:
        self.sequences.clear()

    def launch_step(self, step: worker_pb2.StepRequest) -> _PretendLaunch:
        launched_at = time.perf_counter()
        for seq_id in step.finished_seq_ids:
            self.sequences.pop(seq_id, None)
        for new in step.new_sequences:
            self.sequences[new.seq_id] = [len(new.token_ids), new.num_computed_tokens]
        samples = []
        for entry in step.scheduled:
            state = self.sequences[entry.seq_id]
            state[1] += entry.num_new_tokens
            if state[1] == state[0]:
                state[0] += 1
                samples.append((entry.seq_id, 1000 + entry.seq_id % 1000))
        num_seqs = len(step.scheduled)
        num_decodes = sum(entry.num_new_tokens == 1 for entry in step.scheduled)
        num_prompt_tokens = sum(entry.num_new_tokens for entry in step.scheduled) - num_decodes
        # Holds the GIL, as building inputs and launching kernels do.
        launch_done_at = launched_at + self.costs.launch_seconds(num_seqs)
        while time.perf_counter() < launch_done_at:
            pass
        seconds = self.costs.step_seconds(num_decodes, num_prompt_tokens)
        # The device starts the step once it is queued (the end of the launch) and the
        # device is done with the step before.
        start = max(launch_done_at, self._device_free_at)
        self._device_free_at = start + seconds
        self.observer.device_timer.seconds[PREFILL if num_prompt_tokens else DECODE] += seconds
        return _PretendLaunch(step.step_id, self._device_free_at, samples)

    def read_result(self, launched: _PretendLaunch) -> worker_pb2.StepResult:
        return self.finish_step(launched)

    def finish_step(self, launched: _PretendLaunch) -> worker_pb2.StepResult:
        launched.wait()
        result = worker_pb2.StepResult(step_id=launched.step_id)
        if self.rank:
            return result
        for seq_id, token_id in launched.samples:
            result.seq_ids.append(seq_id)
            result.token_ids.append(token_id)
        return result


async def serve_pretend_worker(
    port: int, metrics_port: int | None, costs: PretendCosts, rank: int, num_ranks: int
) -> None:
    """The worker's gRPC service over a NullRunner, as `pagedserve worker` serves a model."""
    from gpu_worker.servicer import WorkerServicer
    from gpu_worker.step_telemetry import StepTelemetry
    from services.common.grpc_server import ServerConfig, ServiceHost
    from services.common.telemetry import setup_tracing

    name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
    config = ServerConfig(host="127.0.0.1", port=port, shutdown_grace_s=1.0, metrics_port=metrics_port)
    # As `pagedserve worker` does: the OTEL_* variables, when set, turn its tracing on.
    setup_tracing("pagedserve-worker", os.environ, {"pagedserve.worker.rank": rank})
    host = ServiceHost(config, [name])
    servicer = WorkerServicer(StepTelemetry(host.registry, rank))
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, host.server)
    await host.start()

    async def load() -> None:
        # The runner's step methods, for the servicer that serves a ModelRunner's.
        await servicer.load(lambda: cast("ModelRunner", NullRunner(costs, rank=rank, num_ranks=num_ranks)))

    await host.run(prepare=load)


def use_pretend_workers(
    commands: dict[str, list[str]], ports: dict[str, int], costs: PretendCosts, num_ranks: int = 1
) -> None:
    """Puts `num_ranks` pretend workers in the place of the worker among `pagedserve serve`'s
    service commands (services/launcher.py), on ports added to `ports`; rank 0 serves its
    /metrics on ports["worker_metrics"] when there is one."""
    scheduler = commands["scheduler"]
    first_worker_flag = scheduler.index("--worker")
    del scheduler[first_worker_flag : first_worker_flag + 2]
    for rank in range(num_ranks):
        name = worker_name(rank)
        ports.setdefault(name, free_port())
        commands[name] = [
            *(sys.executable, "-m", "benchmarks.pretend_device", "--costs", costs.text()),
            *("--port", str(ports[name]), "--rank", str(rank), "--ranks", str(num_ranks)),
            *(
                ["--metrics-port", str(ports["worker_metrics"])]
                if rank == 0 and "worker_metrics" in ports
                else []
            ),
        ]
        scheduler[first_worker_flag:first_worker_flag] = ["--worker", f"127.0.0.1:{ports[name]}"]
        first_worker_flag += 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--costs", type=PretendCosts.parse, default=PretendCosts(), help="name=value,...")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--metrics-port", type=int, default=None)
    args = parser.parse_args(argv)
    asyncio.run(serve_pretend_worker(args.port, args.metrics_port, args.costs, args.rank, args.ranks))


if __name__ == "__main__":
    main()
