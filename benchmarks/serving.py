"""Online serving: requests arrive open loop (Poisson, or gamma with a burstiness factor)
at each rate of a sweep, against the gRPC API or the OpenAI HTTP API, and each rate's
request and token throughput, TTFT, TPOT, ITL and end-to-end latency percentiles and
goodput under an SLO are reported (the meanings of vLLM's `bench serve`,
benchmarks/serving_metrics.py).

    # against a running server
    python -m benchmarks.serving --grpc 127.0.0.1:50051 --dataset nano-vllm --num-prompts 300 \\
        --request-rates 10,20,40,inf
    python -m benchmarks.serving --http http://127.0.0.1:8000 --dataset short --request-rates 50,inf
    # the load from 4 client processes, so that the client's parsing does not set the pace
    python -m benchmarks.serving --http http://127.0.0.1:8000 --dataset nano-vllm --num-prompts 256 \\
        --request-rates inf --client-processes 4
    # a local `pagedserve serve` started for the run (CPU: the embedded model)
    python -m benchmarks.serving --serve --api grpc,http --dataset short --num-prompts 16 \\
        --request-rates 4,inf --plot serving.png
    # the services in front of a pretend device with the H200's step times (CPU)
    python -m benchmarks.serving --serve --pretend-device --dataset nano-vllm --request-rates 10,20
    # on CUDA, Qwen3-0.6B's shapes with random weights
    python -m benchmarks.serving --serve --device cuda --model-config benchmarks/configs/qwen3-0.6b.json \\
        --dataset random --input-len 512 --output-len 256 --range-ratio 0.8 --num-prompts 300

Each rate's summary goes to --json; --plot draws TTFT and ITL (p50, p99) against the
achieved request rate. With the scheduler's /metrics (--serve reads its own), each rate
also says which share of the gaps between tokens were long at the scheduler and at the
client: whether a latency tail comes from the steps or from what follows them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import httpx

from benchmarks import serving_server_side as server_side
from benchmarks.arguments import benchmark_parser
from benchmarks.serving_clients import grpc_sender, http_sender, run_open_loop, served_model_name
from benchmarks.serving_datasets import DATASETS, DatasetSpec, ServingRequest, build_dataset, for_run
from benchmarks.serving_metrics import Slo, summarize
from benchmarks.serving_processes import run_in_processes

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def arrival_offsets(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times in seconds from the start: gaps drawn from a gamma distribution whose mean
    is 1 / rate (shape `burstiness`: 1 is Poisson, below 1 burstier); an infinite rate
    sends everything at once."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(num):
        offsets.append(now)
        now += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return offsets


async def _run_rate(api: str, target: str, requests: Sequence[ServingRequest], offsets: list[float]) -> tuple:
    if api == "grpc":
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            await channel.channel_ready()
            return await run_open_loop(requests, offsets, grpc_sender(channel))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=target, timeout=None, limits=limits) as client:
        return await run_open_loop(requests, offsets, http_sender(client, await served_model_name(client)))


def sweep(
    args: argparse.Namespace, targets: dict[str, str], service_metrics: dict[str, str] | None = None
) -> list[dict]:
    """Each API's warm-up, then each rate. With the services' /metrics URLs by name, each
    rate also reports which share of the gaps between tokens the scheduler saw long, beside
    the client's, and each service's garbage collector pauses
    (benchmarks/serving_server_side.py)."""
    service_metrics = service_metrics or {}
    scheduler_metrics = service_metrics.get("scheduler")
    spec = DatasetSpec(
        name=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        num_prefixes=args.num_prefixes,
        prefix_len=args.prefix_len,
        seed=args.seed,
    )
    dataset = build_dataset(spec)
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms)
    results = []
    # Every run (warm-ups included) renames the prompts' ids its own way: a rate served
    # from the prefix cache that an earlier rate filled would measure the cache, not the rate.
    runs = itertools.count()
    for api, target in targets.items():
        warmup = [ServingRequest(r.prompt_token_ids, min(r.output_len, 8)) for r in dataset[: args.warmup]]
        warmup = for_run(warmup, next(runs))
        run_in_processes(_run_rate, api, target, warmup, [0.0] * len(warmup), 1)
        for rate in args.request_rates:
            requests = for_run(dataset, next(runs))
            offsets = arrival_offsets(len(requests), rate, args.burstiness, args.seed)
            before = server_side.read_snapshot(scheduler_metrics) if scheduler_metrics else None
            gc_before = {name: server_side.read_gc_pauses(url) for name, url in service_metrics.items()}
            records, duration = run_in_processes(
                _run_rate, api, target, requests, offsets, args.client_processes
            )
            summary = {"api": api, "request_rate": rate, **summarize(records, duration, slo)}
            print(_row(summary), flush=True)
            if before is not None and scheduler_metrics:
                after = server_side.read_snapshot(scheduler_metrics)
                gaps = [gap for r in records if r.error is None for gap in r.itls]
                shares = {f"scheduler {k}": row for k, row in server_side.shares_above(before, after).items()}
                summary["gap_shares"] = {**shares, "client": server_side.client_shares_above(gaps)}
                print(server_side.describe(summary["gap_shares"]), flush=True)
            if gc_before:
                summary["gc_pauses"] = {
                    name: server_side.gc_pauses_between(gc_before[name], server_side.read_gc_pauses(url))
                    for name, url in service_metrics.items()
                }
                print(server_side.describe_gc_pauses(summary["gc_pauses"]), flush=True)
            results.append(summary)
    return results


def _row(s: dict) -> str:
    rate = "inf" if math.isinf(s["request_rate"]) else f"{s['request_rate']:g}"
    return (
        f"{s['api']:4s} rate {rate:>5s}  ok {s['completed']:4d} failed {s['failed']:3d}  "
        f"{s['request_throughput']:7.2f} req/s {s['output_throughput']:9.1f} out tok/s  "
        f"TTFT p50 {s['ttft_ms']['p50']:7.1f} p99 {s['ttft_ms']['p99']:7.1f}  "
        f"TPOT p50 {s['tpot_ms']['p50']:6.1f} p99 {s['tpot_ms']['p99']:6.1f}  "
        f"ITL p50 {s['itl_ms']['p50']:6.1f} p99 {s['itl_ms']['p99']:6.1f}  "
        f"tok/msg {s['tokens_per_message']:4.2f}  "
        f"E2EL p50 {s['e2el_ms']['p50']:8.1f}  goodput {s['goodput']:.2f} req/s"
    )


def plot(results: list[dict], path: Path) -> None:
    """TTFT and ITL p50/p99 against the achieved request rate, one line per API."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for api in sorted({r["api"] for r in results}):
        runs = sorted((r for r in results if r["api"] == api), key=lambda r: r["request_throughput"])
        x = [r["request_throughput"] for r in runs]
        for ax, metric in zip(axes, ("ttft_ms", "itl_ms")):
            for p, style in (("p50", "-o"), ("p99", "--o")):
                ax.plot(x, [r[metric][p] for r in runs], style, label=f"{api} {p}")
    for ax, title in zip(axes, ("time to first token (ms)", "inter-token latency (ms)")):
        ax.set_title(title)
        ax.set_xlabel("achieved request rate (req/s)")
        ax.legend()
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


@contextmanager
def local_server(args: argparse.Namespace, apis: list[str], log_dir: Path) -> Iterator[dict[str, str]]:
    """`pagedserve serve`'s services on free loopback ports; the targets of each API, and
    each service's /metrics URL as "metrics NAME"."""
    from services.launcher import free_port, loopback_service_commands, running_services

    with ExitStack() as stack:
        model_dir = args.model
        if model_dir is None and args.model_config is not None:
            from benchmarks.workload import write_random_model

            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            model_dir = write_random_model(args.model_config, scratch / "model")
        if model_dir is None:
            from services.common.embedded_model import materialize_default_model

            model_dir = materialize_default_model()
        ports = {name: free_port() for name in ("worker", "scheduler", "tokenizer")}
        commands = loopback_service_commands(
            Path(model_dir), ports, ["--device", args.device, *args.serve_flag]
        )
        metrics_ports = {name: free_port() for name in ("scheduler", "tokenizer", "worker")}
        for name, port in metrics_ports.items():
            commands[name] += ["--metrics-port", str(port)]
        if args.pretend_device is not None:
            from benchmarks.pretend_device import PretendCosts, use_pretend_workers

            ports["worker_metrics"] = metrics_ports["worker"]
            use_pretend_workers(commands, ports, PretendCosts.parse(args.pretend_device))
        addresses = {name: f"127.0.0.1:{ports[name]}" for name in commands}
        targets = {"grpc": addresses["tokenizer"]}
        for name, port in metrics_ports.items():
            targets[f"metrics {name}"] = f"http://127.0.0.1:{port}/metrics"
        if args.step_timeline is not None and args.pretend_device is None:
            commands["worker"] += ["--step-timeline", str(args.step_timeline)]
        # The HTTP API only when asked for: it needs the ASGI server's packages.
        if "http" in apis:
            http_port = free_port()
            commands["tokenizer"] += ["--http-port", str(http_port)]
            targets["http"] = f"http://127.0.0.1:{http_port}"
        stack.enter_context(running_services(commands, addresses, log_dir))
        yield targets


def build_parser() -> argparse.ArgumentParser:
    """The serving benchmark's options; what `local_server` reads comes from here too."""
    parser = benchmark_parser(__doc__, json_default="serving.json")
    target = parser.add_argument_group("the server")
    target.add_argument("--grpc", metavar="ADDRESS", help="a running tokenizer's gRPC address")
    target.add_argument("--http", metavar="URL", help="a running HTTP API's base URL")
    target.add_argument(
        "--scheduler-metrics",
        metavar="URL",
        help="a running scheduler's /metrics, to tell the scheduler's share of the latency tail "
        "(with --serve, its own)",
    )
    target.add_argument("--serve", action="store_true", help="start `pagedserve serve` for the run")
    target.add_argument("--api", default="grpc", help="with --serve: grpc, http or grpc,http")
    target.add_argument("--device", default="cpu", help="with --serve")
    target.add_argument("--model", type=Path, default=None, help="with --serve; default: the embedded model")
    target.add_argument("--model-config", type=Path, default=None, help="with --serve: random weights")
    target.add_argument("--serve-flag", action="append", default=[], help="with --serve: a flag for serve")
    target.add_argument(
        "--log-dir", type=Path, default=None, help="with --serve: keep the services' logs here"
    )
    target.add_argument(
        "--step-timeline",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --serve: the worker's step timeline of the whole run (gpu_worker/step_timeline.py; "
        "python -m benchmarks.step_timeline FILE sums it)",
    )
    target.add_argument(
        "--pretend-device",
        nargs="?",
        const="",
        default=None,
        metavar="COSTS",
        help="with --serve: a pretend worker of benchmarks/pretend_device.py in the worker's "
        "place, its step costs as name=value,... (default: the H200's)",
    )
    load = parser.add_argument_group("the load")
    load.add_argument("--dataset", choices=sorted(DATASETS), default="random")
    load.add_argument("--num-prompts", type=int, default=200)
    load.add_argument("--input-len", type=int, default=1024)
    load.add_argument("--output-len", type=int, default=128)
    load.add_argument("--range-ratio", type=float, default=0.0)
    load.add_argument("--num-prefixes", type=int, default=4)
    load.add_argument("--prefix-len", type=int, default=512)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--request-rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default=[float("inf")],
        help="requests per second, comma-separated; inf sends all at once",
    )
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1: Poisson")
    load.add_argument("--client-processes", type=int, default=1, help="processes sending the requests")
    load.add_argument("--warmup", type=int, default=4, help="short requests sent before each API's sweep")
    slo = parser.add_argument_group("goodput's SLO (ms)")
    slo.add_argument("--slo-ttft-ms", type=float, default=None)
    slo.add_argument("--slo-tpot-ms", type=float, default=None)
    slo.add_argument("--slo-e2el-ms", type=float, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="a PNG of latency against rate")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    with ExitStack() as stack:
        if args.serve:
            log_dir = args.log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            apis = args.api.split(",")
            served = stack.enter_context(local_server(args, apis, log_dir))
            targets = {api: served[api] for api in apis}
            metrics = {
                name.removeprefix("metrics "): url
                for name, url in served.items()
                if name.startswith("metrics ")
            }
        else:
            targets = {api: t for api, t in (("grpc", args.grpc), ("http", args.http)) if t}
            metrics = {"scheduler": args.scheduler_metrics} if args.scheduler_metrics else {}
        if not targets:
            parser.error("give --grpc, --http or --serve")
        results = sweep(args, targets, metrics)
    args.json.write_text(json.dumps({"args": _plain(vars(args)), "results": results}, indent=2))
    if args.plot is not None:
        plot(results, args.plot)


def _plain(values: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


if __name__ == "__main__":
    main()
