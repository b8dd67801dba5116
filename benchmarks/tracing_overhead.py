"""What tracing costs: the gRPC throughput run with tracing off, and on with every request
sampled and exported to a real OTLP receiver on loopback, in alternating order so that
drift of the machine hits both alike.

Two measures: throughput (noisy on a shared machine: the median of the pairs' ratios),
and the CPU time each service spends per output token, which is what tracing adds work
to and what limits throughput when the services are CPU-bound. The model runs on one
thread (OMP_NUM_THREADS=1), so that its compute does not swing with how busy the other
processes keep the cores; a first run, not counted, warms the machine up.

    python -m benchmarks.tracing_overhead [--device cpu] [--repeats 6] [--json tracing.json]
    python -m benchmarks.tracing_overhead --device cuda --swap-space 0 --num-seqs 256 \
        --min-len 100 --max-len 1024 --repeats 3      # the nano-vllm workload on a GPU

On CUDA the model is --model-config's architecture with random weights, as in
benchmarks/throughput.py; on CPU the embedded model.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.arguments import benchmark_parser
from benchmarks.engine_settings import EngineSettings, add_engine_args
from benchmarks.pagedserve_runs import run_grpc
from benchmarks.workload import QWEN3_CONFIG, nano_vllm_workload, write_random_model
from devtools.otlp_receiver import trace_receiver, tracing_to


def main() -> None:
    parser = benchmark_parser(__doc__, "tracing_overhead.json")
    add_engine_args(parser, max_model_len=4096)
    parser.set_defaults(device="cpu")
    parser.add_argument("--model-config", type=Path, default=QWEN3_CONFIG)
    parser.add_argument("--num-seqs", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    workload = nano_vllm_workload(args.num_seqs, args.min_len, args.max_len)
    settings = EngineSettings.from_args(args)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    # mode -> service -> CPU microseconds per output token, per run.
    cpu_per_token: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    os.environ["OMP_NUM_THREADS"] = "1"
    with trace_receiver() as (receiver, endpoint), tempfile.TemporaryDirectory() as scratch:
        if args.device.startswith("cuda"):
            model_dir = write_random_model(args.model_config, Path(scratch) / "model", with_weights=False)
            settings = replace(settings, load_format="dummy")
        else:
            from services.common.embedded_model import materialize_default_model

            model_dir = materialize_default_model()
        run_grpc(model_dir, workload, settings, Path(scratch) / "warm-up")
        for repeat in range(args.repeats):
            # Alternating which goes first cancels what the first run of a pair pays.
            for mode in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                with tracing_to(endpoint) if mode == "on" else contextlib.nullcontext():
                    result = run_grpc(model_dir, workload, settings, Path(scratch) / f"{mode}{repeat}")
                rates[mode].append(result.tokens_per_second)
                for key, value in result.profile.items():
                    if key.startswith("cpu_s."):
                        service = key.removeprefix("cpu_s.")
                        cpu_per_token[mode].setdefault(service, []).append(1e6 * value / result.output_tokens)
                cpu_now = ", ".join(
                    f"{name} {values[-1]:,.0f}" for name, values in cpu_per_token[mode].items()
                )
                print(
                    f"tracing {mode}: {result.tokens_per_second:,.1f} tok/s; CPU us/token: {cpu_now}",
                    file=sys.stderr,
                    flush=True,
                )
        spans_received = len(receiver.spans)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    pair_overheads = [1.0 - on_rate / off_rate for off_rate, on_rate in zip(rates["off"], rates["on"])]
    services = sorted(cpu_per_token["off"])
    cpu_median = {
        mode: {name: statistics.median(cpu_per_token[mode][name]) for name in services}
        for mode in ("off", "on")
    }
    summary = {
        "device": args.device,
        "num_seqs": args.num_seqs,
        "repeats": args.repeats,
        "tok_per_s": rates,
        "median_off": off,
        "median_on": on,
        "pair_overheads": pair_overheads,
        "median_pair_overhead": statistics.median(pair_overheads),
        "cpu_us_per_token": cpu_per_token,
        "median_cpu_us_per_token": cpu_median,
        "spans_received": spans_received,
    }
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"| tracing | median tok/s | {' | '.join(f'{name} CPU us/token' for name in services)} |")
    print(f"| --- | ---: |{' ---: |' * len(services)}")
    for mode, rate in (("off", off), ("on (always_on)", on)):
        cpu = cpu_median[mode.split()[0]]
        print(f"| {mode} | {rate:,.1f} | {' | '.join(f'{cpu[name]:,.0f}' for name in services)} |")
    print(
        f"throughput overhead: median of pairs {100 * statistics.median(pair_overheads):.1f}% "
        f"(pairs: {', '.join(f'{100 * o:.1f}%' for o in pair_overheads)}); {spans_received} spans received"
    )


if __name__ == "__main__":
    main()
