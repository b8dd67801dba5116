"""What tracing costs: the gRPC throughput run with tracing off, and on with every request
sampled and exported to a real OTLP receiver on loopback, in alternating order so that
drift of the machine hits both alike.

    python -m benchmarks.tracing_overhead [--device cpu] [--repeats 4] [--json tracing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.pagedserve_runs import EngineSettings, run_grpc
from benchmarks.workload import nano_vllm_workload
from services.common.embedded_model import materialize_default_model
from tests.otlp_receiver import trace_receiver

TRACING_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_TRACES_SAMPLER")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-seqs", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path("tracing_overhead.json"))
    args = parser.parse_args()

    model_dir = materialize_default_model()
    workload = nano_vllm_workload(args.num_seqs, args.min_len, args.max_len)
    settings = EngineSettings(device=args.device)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with trace_receiver() as (receiver, endpoint), tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            # Alternating which goes first cancels what the first run of a pair pays.
            for mode in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                for name in TRACING_VARIABLES:
                    os.environ.pop(name, None)
                if mode == "on":
                    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                                       "OTEL_TRACES_SAMPLER": "always_on"})
                result = run_grpc(model_dir, workload, settings, Path(scratch) / f"{mode}{repeat}")
                rates[mode].append(result.tokens_per_second)
                print(f"tracing {mode}: {result.tokens_per_second:,.1f} tok/s", file=sys.stderr, flush=True)
        spans_received = len(receiver.spans)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    summary = {"device": args.device, "num_seqs": args.num_seqs, "repeats": args.repeats,
               "tok_per_s": rates, "median_off": off, "median_on": on,
               "overhead_fraction": 1.0 - on / off, "spans_received": spans_received}
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"| tracing | median tok/s |\n| --- | ---: |\n| off | {off:,.1f} |\n| on (always_on) | {on:,.1f} |")
    print(f"overhead: {100 * (1 - on / off):.1f}% ({spans_received} spans received)")


if __name__ == "__main__":
    main()
