"""What the services cost when the device is fast, without a device: the in-process engine
and the three gRPC services in front of a worker whose model is a pretend device, on the
nano-vllm workload. The pretend device takes, per step, a fixed time plus a time per
decoding sequence and per prompt token (by default the H200's measured step times for the
Qwen3-0.6B benchmark), queued one step after another as on a GPU; launching a step holds
the worker's GIL for a time per step and per sequence, as the real worker's input building
and kernel launches do.

    python -m benchmarks.service_overhead                       # both runs
    python -m benchmarks.service_overhead --runs grpc --num-seqs 64 --max-steps-in-flight 1
    python -m benchmarks.service_overhead --runs grpc --ranks 4   # a step to 4 ranks

Prints output tokens per second, the share of the run the pretend device was busy (what
is left is what the host made it wait), and the CPU seconds each process spent, so that
the process that limits the gRPC stack shows; writes them to --json. The host here is
not the GPU machine's: with fewer cores the services and clients contend for them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pagedserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from benchmarks.arguments import benchmark_parser
from benchmarks.pagedserve_runs import EngineSettings, RunResult, drive_runs, run_grpc
from benchmarks.serving_datasets import DatasetSpec, build_dataset
from benchmarks.workload import Workload, nano_vllm_workload
from devtools.otlp_receiver import trace_receiver, tracing_to
from gpu_worker.device_time import DECODE, PREFILL
from services.common.step_limits import StepLimits
from services.launcher import free_port
from services.serve_layout import worker_name


@dataclass(frozen=True)
class PretendCosts:
    # Device time of a step: fixed, per sequence in a decode-only step, per prompt token.
    # Defaults: the H200's decode steps (0.90 ms at 1 sequence, 2.63 at 64, 8.3 at 256) and
    # its 0.37 s of prefill device time over the workload's 142,827 prompt tokens.
    step_base_ms: float = 0.85
    step_ms_per_seq: float = 0.029
    step_us_per_prompt_token: float = 2.6
    # Host time launching a step holds the GIL: fixed and per sequence.
    launch_base_ms: float = 1.0
    launch_us_per_seq: float = 5.0

    def step_seconds(self, num_seqs: int, num_tokens: int) -> float:
        if not num_seqs:
            return 0.0
        if num_tokens == num_seqs:
            return (self.step_base_ms + self.step_ms_per_seq * num_seqs) / 1e3
        return self.step_base_ms / 1e3 + self.step_us_per_prompt_token * num_tokens / 1e6

    def launch_seconds(self, num_seqs: int) -> float:
        return self.launch_base_ms / 1e3 + self.launch_us_per_seq * num_seqs / 1e6


class _PretendLaunch:
    def __init__(self, step_id: int, done_at: float, samples: list[tuple[int, int]]) -> None:
        self.step_id, self.done_at, self.samples = step_id, done_at, samples

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
        num_tokens = sum(entry.num_new_tokens for entry in step.scheduled)
        # Holds the GIL, as building inputs and launching kernels do.
        launch_done_at = launched_at + self.costs.launch_seconds(num_seqs)
        while time.perf_counter() < launch_done_at:
            pass
        seconds = self.costs.step_seconds(num_seqs, num_tokens)
        # The device starts the step once it is queued (the end of the launch) and the
        # device is done with the step before.
        start = max(launch_done_at, self._device_free_at)
        self._device_free_at = start + seconds
        self.observer.device_timer.seconds[DECODE if num_tokens == num_seqs else PREFILL] += seconds
        return _PretendLaunch(step.step_id, self._device_free_at, samples)

    def finish_step(self, launched: _PretendLaunch) -> worker_pb2.StepResult:
        launched.wait()
        result = worker_pb2.StepResult(step_id=launched.step_id)
        if self.rank:
            return result
        for seq_id, token_id in launched.samples:
            result.seq_ids.append(seq_id)
            result.token_ids.append(token_id)
        return result


async def _serve_null_worker(
    port: int, metrics_port: int | None, costs: PretendCosts, rank: int, num_ranks: int
) -> None:
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
        await servicer.load(lambda: NullRunner(costs, rank=rank, num_ranks=num_ranks))

    await host.run(prepare=load)


def _cost_args(costs: PretendCosts) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in vars(costs).items()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "service_overhead.json")
    for name, value in vars(PretendCosts()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=value)
    parser.add_argument("--runs", default="inprocess,grpc", help="comma-separated: inprocess, grpc")
    parser.add_argument(
        "--dataset",
        default="nano-vllm",
        choices=["nano-vllm", "short"],
        help="short: prompts and outputs of U[20,200] tokens (benchmarks/serving_datasets.py)",
    )
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument(
        "--max-steps-in-flight",
        type=int,
        default=EngineSettings.max_steps_in_flight,
        help="the scheduler's; 1: no overlap",
    )
    parser.add_argument("--max-stream-messages-per-step", type=int, default=32, help="0: no limit")
    parser.add_argument(
        "--model", type=Path, default=None, help="tokenizer's model directory; default: embedded"
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="run the scheduler and tokenizer under cProfile, writing NAME.prof here",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="pretend workers the scheduler sends each step to, as to a tensor-parallel engine",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="the gRPC run with every request traced, exported to an OTLP receiver on loopback",
    )
    parser.add_argument("--serve-null-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-port", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_grpc_with_pretend_device(
    args: argparse.Namespace, costs: PretendCosts, workload: Workload, settings: EngineSettings
) -> RunResult:
    """The three services on loopback, the worker's process serving a NullRunner."""

    def pretend_worker(commands: dict[str, list[str]], ports: dict[str, int]) -> None:
        scheduler = commands["scheduler"]
        first_worker_flag = scheduler.index("--worker")
        del scheduler[first_worker_flag : first_worker_flag + 2]
        for rank in range(args.ranks):
            name = worker_name(rank)
            ports.setdefault(name, free_port())
            commands[name] = [
                sys.executable,
                "-m",
                "benchmarks.service_overhead",
                *_cost_args(costs),
                "--serve-null-worker",
                str(ports[name]),
                "--rank",
                str(rank),
                "--ranks",
                str(args.ranks),
                *(["--metrics-port", str(ports["worker_metrics"])] if rank == 0 else []),
            ]
            scheduler[first_worker_flag:first_worker_flag] = ["--worker", f"127.0.0.1:{ports[name]}"]
            first_worker_flag += 2
        if args.profile_dir is not None:
            args.profile_dir.mkdir(parents=True, exist_ok=True)
            for name in ("scheduler", "tokenizer"):
                profiled = [
                    sys.executable,
                    "-m",
                    "cProfile",
                    "-o",
                    str(args.profile_dir / f"{name}.prof"),
                ]
                commands[name] = [*profiled, *commands[name][1:]]

    with tempfile.TemporaryDirectory(prefix="service-overhead-") as scratch:
        return run_grpc(
            args.model or _embedded_model(),
            workload,
            settings,
            Path(scratch) / "logs",
            args.clients,
            adjust_commands=pretend_worker,
        )


def _embedded_model() -> Path:
    from services.common.embedded_model import materialize_default_model

    return materialize_default_model()


@contextmanager
def _tracing(on: bool) -> Iterator[None]:
    """With `on`, the services started meanwhile trace every request to a receiver here."""
    if not on:
        yield
        return
    with trace_receiver() as (receiver, endpoint), tracing_to(endpoint):
        yield
    print(f"{len(receiver.spans):,} spans received")


def _workload(dataset: str, num_seqs: int) -> Workload:
    if dataset == "nano-vllm":
        return nano_vllm_workload(num_seqs, 100, 1024, 10000)
    requests = build_dataset(DatasetSpec(dataset, num_seqs))
    return Workload([r.prompt_token_ids for r in requests], [r.output_len for r in requests])


def report(args: argparse.Namespace, costs: PretendCosts, results: list[RunResult]) -> None:
    """Prints each run's rate, the pretend device's busy share and each process's CPU;
    writes them to args.json."""
    summary = {
        "costs": vars(costs),
        "max_steps_in_flight": args.max_steps_in_flight,
        "dataset": args.dataset,
        "tracing": args.tracing,
        "num_seqs": args.num_seqs,
        "max_stream_messages_per_step": args.max_stream_messages_per_step,
        "ranks": args.ranks,
        "runs": {},
    }
    print(f"pretend device: {costs}")
    for result in results:
        busy = result.profile["device_busy_s"]
        cpu = {
            name.removeprefix("cpu_s."): seconds
            for name, seconds in result.profile.items()
            if name.startswith("cpu_s.")
        }
        summary["runs"][result.name] = {
            "output_tokens": result.output_tokens,
            "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second,
            "device_busy_s": busy,
            "cpu_seconds": cpu,
            "cpu_us_per_token": {name: 1e6 * s / result.output_tokens for name, s in cpu.items()},
        }
        print(
            f"{result.name:32} {result.output_tokens:,} tokens in {result.seconds:.2f} s: "
            f"{result.tokens_per_second:,.0f} tok/s, device busy {busy:.2f} s ({busy / result.seconds:.1%})"
        )
        for name, seconds_used in cpu.items():
            print(
                f"  {name:10} {seconds_used:6.2f} CPU s  {1e6 * seconds_used / result.output_tokens:6.1f} us/token"
            )
    args.json.write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    costs = PretendCosts(**{name: getattr(args, name) for name in vars(PretendCosts())})
    if args.serve_null_worker is not None:
        asyncio.run(
            _serve_null_worker(args.serve_null_worker, args.metrics_port, costs, args.rank, args.ranks)
        )
        return
    workload = _workload(args.dataset, args.num_seqs)
    settings = EngineSettings.from_args(args, device="cpu")
    results: list[RunResult] = []
    if "inprocess" in args.runs:
        results += drive_runs(NullRunner(costs), workload, settings, [settings.max_steps_in_flight])
    if "grpc" in args.runs:
        with _tracing(args.tracing):
            results.append(run_grpc_with_pretend_device(args, costs, workload, settings))
    report(args, costs, results)


if __name__ == "__main__":
    main()
