"""What the services cost when the device is fast, without a device: the in-process engine
and the three gRPC services in front of a worker whose model is a pretend device
(benchmarks/pretend_device.py), on the nano-vllm workload.

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
import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.arguments import benchmark_parser
from benchmarks.engine_settings import EngineSettings
from benchmarks.pagedserve_runs import RunResult, drive_runs, run_grpc
from benchmarks.pretend_device import NullRunner, PretendCosts, use_pretend_workers
from benchmarks.serving_datasets import DatasetSpec, build_dataset
from benchmarks.workload import Workload, nano_vllm_workload
from devtools.otlp_receiver import trace_receiver, tracing_to


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
    return parser.parse_args(argv)


def run_grpc_with_pretend_device(
    args: argparse.Namespace, costs: PretendCosts, workload: Workload, settings: EngineSettings
) -> RunResult:
    """The three services on loopback, the worker's process serving a NullRunner."""

    def pretend_worker(commands: dict[str, list[str]], ports: dict[str, int]) -> None:
        use_pretend_workers(commands, ports, costs, args.ranks)
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
