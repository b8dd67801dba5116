"""The nano-vllm throughput benchmark, side by side in one process on one device.

    python -m benchmarks.throughput --device cuda --json results.json            # H200 run
    python -m benchmarks.throughput --device cuda --runs inprocess,grpc --overlap both
    python -m benchmarks.throughput --device cpu --num-seqs 4 --min-len 8 --max-len 16

Workload (DESIGN.md, "How performance is measured"): random.seed(0); 256 prompts of
randint(100, 1024) token ids in [0, 10000], then one randint(100, 1024) output length
each; greedy, ignore_eos; output tokens per second. On CUDA the model is Qwen3-0.6B's
architecture (benchmarks/configs/qwen3-0.6b.json) with seeded random bf16 weights; on CPU
the embedded default model.

Runs: pagedserve in-process, pagedserve through the three gRPC services, HF transformers'
continuous batching (generate_batch's manager, paged|sdpa) and HF generate() on static
batches. The pagedserve runs overlap scheduling with the device (the default), or not
(--overlap off), or run both ways (--overlap both). The HF runs may take a subset of the
sequences (--hf-num-seqs), since they are tens of times slower; their tok/s is for that
subset, which the table says.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.arguments import benchmark_parser
from benchmarks.engine_settings import EngineSettings, add_engine_args
from benchmarks.pagedserve_runs import LATE_COMPILES_KEY, RunResult, run_grpc, run_in_process
from benchmarks.step_timeline import format_summary
from benchmarks.workload import (
    QWEN3_CONFIG,
    Workload,
    kv_bytes_per_token,
    nano_vllm_workload,
    prefill_flops,
    roofline_seconds,
    step_weight_bytes,
    write_random_model,
)

# Device-to-device copy on an H200, bytes read + written per second (DESIGN.md).
H200_COPY_BANDWIDTH = 4.25e12
# Dense bf16 tensor-core peak of an H200 (SXM) by its specification, operations per second.
H200_BF16_PEAK_FLOPS = 989e12
RUN_NAMES = ("inprocess", "grpc", "hf_cb", "hf_static")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "throughput.json")
    add_workload_args(parser)
    parser.add_argument("--runs", default=",".join(RUN_NAMES), help=f"comma-separated subset of {RUN_NAMES}")
    parser.add_argument(
        "--hf-num-seqs", type=int, default=None, help="sequences for the HF runs; default: all"
    )
    parser.add_argument("--hf-static-batch", type=int, default=64)
    parser.add_argument(
        "--overlap",
        choices=["on", "off", "both"],
        default="on",
        help="overlapped scheduling in the pagedserve runs (both: each run twice)",
    )
    parser.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help="copy bandwidth (bytes/s) for the roofline; default: the H200's measured one on an H200 "
        "(what the targets are set against), else one measured after the runs",
    )
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=H200_BF16_PEAK_FLOPS,
        help="the device's dense tensor-core peak (operations/s) for the bound with the prompts' compute",
    )
    return parser.parse_args(argv)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The engine's options, the model's, the workload's and the gRPC run's."""
    add_engine_args(parser, max_model_len=4096)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model directory; default: random weights for --model-config on CUDA, the embedded model on CPU",
    )
    parser.add_argument("--model-config", type=Path, default=QWEN3_CONFIG)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--max-token-id", type=int, default=10000)
    parser.add_argument("--grpc-clients", type=int, default=4, help="client processes for the gRPC run")
    parser.add_argument("--log-dir", type=Path, default=None, help="service logs of the gRPC runs")


def roofline_bandwidth(given: float | None, device_label: str, measure: Callable[[], float]) -> float:
    """The bandwidth the roofline is taken at: `given`, else the H200's measured copy
    bandwidth on an H200 or on CPU (where no roofline is printed), else `measure()` on this
    device, so that fractions on another GPU are of its own bandwidth."""
    if given is not None:
        return given
    if "H200" in device_label or not device_label.startswith("NVIDIA"):
        return H200_COPY_BANDWIDTH
    return measure()


def _measure_copy_bandwidth() -> float:
    from benchmarks.kernels.decode_step import copy_bandwidth

    try:
        return copy_bandwidth(1 << 30)
    except RuntimeError as error:  # out of memory, say: the runs' numbers must still be written
        print(f"copy bandwidth not measured ({error}); the roofline is the H200's", file=sys.stderr)
        return H200_COPY_BANDWIDTH


def resolve_model(args: argparse.Namespace, scratch: Path) -> Path:
    if args.model is not None:
        return args.model
    if args.device.startswith("cuda"):
        with_weights = args.load_format != "dummy"
        return write_random_model(args.model_config, scratch / "model", with_weights=with_weights)
    from services.common.embedded_model import materialize_default_model

    return materialize_default_model()


def run_all(args: argparse.Namespace, model_dir: Path, workload: Workload, scratch: Path) -> list[RunResult]:
    import torch

    runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = set(runs) - set(RUN_NAMES)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {RUN_NAMES}")
    # Each pagedserve run's depth comes from steps_in_flight, below.
    settings = EngineSettings.from_args(args)
    hf_workload = workload.subset(args.hf_num_seqs or len(workload.prompts))
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    depth = args.max_steps_in_flight
    steps_in_flight = {"on": [depth], "off": [1], "both": [depth, 1]}[args.overlap]
    results: list[RunResult] = []
    for name in runs:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            new_results = _run_one(
                name, args, model_dir, workload, hf_workload, settings, dtype, scratch, steps_in_flight
            )
        except Exception as error:  # one broken run must not lose the others' numbers
            traceback.print_exc()
            results.append(RunResult(name, 0.0, 0, note=f"failed: {type(error).__name__}: {error}"[:300]))
            continue
        for result in new_results:
            num_seqs = len(result.outputs)
            if num_seqs < len(workload.prompts):
                result.note = (result.note + "; " if result.note else "") + f"first {num_seqs} sequences"
            print(f"  {result.name}: {result.tokens_per_second:,.0f} tok/s", file=sys.stderr, flush=True)
        results.extend(new_results)
    return results


def _run_one(
    name: str,
    args: argparse.Namespace,
    model_dir: Path,
    workload: Workload,
    hf_workload: Workload,
    settings: EngineSettings,
    dtype,
    scratch: Path,
    steps_in_flight: list[int],
) -> list[RunResult]:
    if name == "inprocess":
        return run_in_process(model_dir, workload, settings, steps_in_flight)
    if name == "grpc":
        log_dir = args.log_dir or scratch / "logs"
        return [
            run_grpc(
                model_dir, workload, replace(settings, max_steps_in_flight=depth), log_dir, args.grpc_clients
            )
            for depth in steps_in_flight
        ]
    if name == "hf_cb":
        from benchmarks.hf_runs import run_hf_continuous_batching

        return [run_hf_continuous_batching(model_dir, hf_workload, args.device, dtype)]
    from benchmarks.hf_runs import run_hf_static

    return [run_hf_static(model_dir, hf_workload, args.device, dtype, args.hf_static_batch)]


def summarize(
    args: argparse.Namespace, model_dir: Path, workload: Workload, results: list[RunResult]
) -> dict:
    on_cuda = args.device.startswith("cuda")
    dtype_bytes = 2 if on_cuda else 4
    weight_bytes = step_weight_bytes(model_dir, dtype_bytes)
    kv_token_bytes = kv_bytes_per_token(model_dir, dtype_bytes)
    reference = next((r for r in results if r.name == "pagedserve in-process"), None)
    inprocess_outputs = reference.outputs if reference else None
    runs = {}
    for result in results:
        subset = workload.subset(len(result.outputs) or len(workload.prompts))
        memory_seconds = roofline_seconds(subset, weight_bytes, kv_token_bytes, args.bandwidth)
        roofline_tps = subset.num_output_tokens / memory_seconds
        # The roofline leaves the prompts' arithmetic out; where it is a large share (8B
        # models) this bound says what a device at its peak in both could give.
        bound_tps = subset.num_output_tokens / (
            memory_seconds + prefill_flops(subset, model_dir) / args.peak_flops
        )
        entry = {
            "name": result.name,
            "seconds": result.seconds,
            "output_tokens": result.output_tokens,
            "num_seqs": len(result.outputs),
            "tokens_per_second": result.tokens_per_second,
            "ratio_to_pagedserve": result.tokens_per_second / reference.tokens_per_second
            if reference
            else None,
            "roofline_tokens_per_second": roofline_tps if on_cuda else None,
            "roofline_fraction": result.tokens_per_second / roofline_tps if on_cuda else None,
            "bound_with_prompt_flops_tokens_per_second": bound_tps if on_cuda else None,
            "bound_with_prompt_flops_fraction": result.tokens_per_second / bound_tps if on_cuda else None,
            "note": result.note,
        }
        if result.profile:
            entry["profile"] = result.profile
        if result.timeline:
            entry["step_timeline"] = result.timeline
        if inprocess_outputs is not None and result is not reference:
            entry["greedy_prefix_match"] = _prefix_match(inprocess_outputs, result.outputs)
        runs[result.name] = entry
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(args.device),
        "command": " ".join(["python -m benchmarks.throughput", *sys.argv[1:]]),
        "model_dir": str(model_dir),
        "workload": {
            "num_seqs": len(workload.prompts),
            "prompt_tokens": workload.num_prompt_tokens,
            "output_tokens": workload.num_output_tokens,
        },
        # Every weight once: what a full batch's step reads.
        "weight_bytes": weight_bytes(None),
        "kv_bytes_per_token": kv_token_bytes,
        "bandwidth": args.bandwidth,
        "peak_flops": args.peak_flops,
        "runs": runs,
    }


def _prefix_match(expected: list[list[int]], actual: list[list[int]]) -> dict:
    """How many leading tokens of each sequence agree (greedy runs; bf16 near-ties end it)."""
    prefixes, identical = [], 0
    for want, got in zip(expected, actual):
        length = 0
        while length < min(len(want), len(got)) and want[length] == got[length]:
            length += 1
        prefixes.append(length)
        identical += want == got
    prefixes.sort()
    return {
        "sequences": len(prefixes),
        "identical": identical,
        "min_prefix": prefixes[0] if prefixes else 0,
        "median_prefix": prefixes[len(prefixes) // 2] if prefixes else 0,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def print_table(summary: dict) -> None:
    with_roofline = any(entry["roofline_fraction"] is not None for entry in summary["runs"].values())
    print(
        f"\n{summary['device']}: {summary['workload']['num_seqs']} seqs, "
        f"{summary['workload']['prompt_tokens']:,} prompt / {summary['workload']['output_tokens']:,} output tokens"
        + (f", roofline at {summary['bandwidth'] / 1e12:.2f} TB/s" if with_roofline else "")
    )
    # Device busy: the share of the run's seconds the device spent computing steps; the
    # rest it waited for the host (or, through gRPC, for the services and the clients).
    # roofline: of the memory roofline; bound: of that plus the prompts' arithmetic at peak.
    header = (
        f"{'run':42} {'tok/s':>10} {'ratio':>7} {'roofline':>9} {'bound':>7} {'seconds':>8} {'busy':>6}  note"
    )
    print(header)
    print("-" * len(header))
    for entry in summary["runs"].values():
        ratio = f"{entry['ratio_to_pagedserve']:.3f}" if entry["ratio_to_pagedserve"] is not None else "-"
        roofline = f"{entry['roofline_fraction']:.1%}" if entry["roofline_fraction"] is not None else "-"
        bound = entry["bound_with_prompt_flops_fraction"]
        bound_text = f"{bound:.1%}" if bound is not None else "-"
        busy_s = entry.get("profile", {}).get("device_busy_s")
        busy = f"{busy_s / entry['seconds']:.1%}" if busy_s is not None and entry["seconds"] else "-"
        print(
            f"{entry['name']:42} {entry['tokens_per_second']:>10,.0f} {ratio:>7} {roofline:>9} {bound_text:>7} "
            f"{entry['seconds']:>8.2f} {busy:>6}  {entry['note']}"
        )
    for entry in summary["runs"].values():
        compiles = {
            key.removeprefix(LATE_COMPILES_KEY): count
            for key, count in entry.get("profile", {}).items()
            if key.startswith(LATE_COMPILES_KEY)
        }
        if compiles:
            listed = ", ".join(f"{kernel} ×{count:.0f}" for kernel, count in sorted(compiles.items()))
            print(f"\n{entry['name']}: kernel variants first compiled during the run: {listed}")
        if "step_timeline" in entry:
            print(f"\n{entry['name']}, worker step timeline: {format_summary(entry['step_timeline'])}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = nano_vllm_workload(args.num_seqs, args.min_len, args.max_len, args.max_token_id)
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as scratch_name:
        scratch = Path(scratch_name)
        model_dir = resolve_model(args, scratch)
        results = run_all(args, model_dir, workload, scratch)
        # After the runs, so that they start on a device as they always have.
        args.bandwidth = roofline_bandwidth(args.bandwidth, device_name(args.device), _measure_copy_bandwidth)
        summary = summarize(args, model_dir, workload, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    print_table(summary)


if __name__ == "__main__":
    main()
