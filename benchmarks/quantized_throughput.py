"""The nano-vllm workload through gRPC in each quantization mode, side by side in one run.

    python -m benchmarks.quantized_throughput --device cuda --swap-space 0 \\
        --model-config benchmarks/configs/llama-3.1-8b.json --load-format dummy \\
        --modes bf16,fp8+fp8-kv,fp8,fp8-kv,awq --json quantized_throughput.json

A mode is named as benchmarks.kernels.quantized_decode names it: "bf16" (unquantized, in
the model's dtype), a --quantization method, "fp8-kv" (an fp8 KV cache), or several joined
by "+". Each run is benchmarks.throughput's gRPC run: one engine of three services, started
for the run, serving the whole workload. The modes run in the order given, then in reverse,
and so on for --repeats rounds (two: A B B A), so that a machine that drifts over the run
weighs on every mode alike. The table gives each mode's runs, their mean and the mean over
the first mode's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from statistics import mean

from benchmarks.arguments import benchmark_parser
from benchmarks.engine_settings import EngineSettings
from benchmarks.kernels.quantized_decode import worker_options
from benchmarks.pagedserve_runs import run_grpc
from benchmarks.throughput import add_workload_args, device_name, resolve_model
from benchmarks.workload import nano_vllm_workload
from gpu_worker.config import WorkerConfig

DEFAULT_MODES = "bf16,fp8+fp8-kv,fp8,fp8-kv,awq"


def run_order(modes: list[str], repeats: int) -> list[str]:
    """The modes in order, then reversed, alternately, `repeats` rounds."""
    return [mode for lap in range(repeats) for mode in (modes if lap % 2 == 0 else modes[::-1])]


def mode_settings(args: argparse.Namespace, mode: str) -> EngineSettings:
    """The command line's engine settings with the mode's quantization and cache dtype in
    place of any given there."""
    unquantized = {"quantization": None, "kv_cache_dtype": WorkerConfig.kv_cache_dtype}
    return EngineSettings.from_args(args, **{**unquantized, **worker_options(mode)})


def summarize(modes: list[str], runs: list[dict]) -> dict[str, dict]:
    """Per mode: its runs' tok/s, their mean and the mean over the first mode's (None where
    a mode has no completed run)."""
    by_mode = {
        mode: [run["tokens_per_second"] for run in runs if run["mode"] == mode and not run["error"]]
        for mode in modes
    }
    means = {mode: mean(rates) if rates else None for mode, rates in by_mode.items()}
    baseline = means[modes[0]]
    return {
        mode: {
            "tokens_per_second": by_mode[mode],
            "mean": means[mode],
            "ratio_to_first": means[mode] / baseline if means[mode] and baseline else None,
        }
        for mode in modes
    }


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, "quantized_throughput.json")
    add_workload_args(parser)
    parser.add_argument(
        "--modes", default=DEFAULT_MODES, help="comma-separated modes; ratios are to the first"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the modes, alternately reversed")
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    settings = {mode: mode_settings(args, mode) for mode in modes}  # a misspelt mode fails here
    workload = nano_vllm_workload(args.num_seqs, args.min_len, args.max_len, args.max_token_id)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as scratch_name:
        scratch = Path(scratch_name)
        model_dir = resolve_model(args, scratch)
        log_dir = args.log_dir or scratch / "logs"
        for index, mode in enumerate(run_order(modes, args.repeats)):
            print(f"running {mode} ...", file=sys.stderr, flush=True)
            run = {"mode": mode, "tokens_per_second": 0.0, "seconds": 0.0, "output_tokens": 0, "error": None}
            try:
                result = run_grpc(
                    model_dir, workload, settings[mode], log_dir / f"{index}-{mode}", args.grpc_clients
                )
                run.update(
                    tokens_per_second=result.tokens_per_second,
                    seconds=result.seconds,
                    output_tokens=result.output_tokens,
                    device_busy_s=result.profile.get("device_busy_s"),
                )
            except Exception as error:  # one broken mode must not lose the others' numbers
                traceback.print_exc()
                run["error"] = f"{type(error).__name__}: {error}"[:300]
            print(f"  {mode}: {run['tokens_per_second']:,.0f} tok/s", file=sys.stderr, flush=True)
            runs.append(run)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(args.device),
        "command": " ".join(["python -m benchmarks.quantized_throughput", *sys.argv[1:]]),
        "workload": {"num_seqs": len(workload.prompts), "output_tokens": workload.num_output_tokens},
        "runs": runs,
        "modes": summarize(modes, runs),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    print_table(summary)


def print_table(summary: dict) -> None:
    print(f"\n{summary['device']}: {summary['workload']['num_seqs']} seqs, through gRPC")
    print(f"{'mode':16} {'runs (tok/s)':32} {'mean':>9} {'ratio':>7}")
    for mode, entry in summary["modes"].items():
        runs = " / ".join(f"{rate:,.0f}" for rate in entry["tokens_per_second"]) or "failed"
        mean_text = f"{entry['mean']:,.0f}" if entry["mean"] else "-"
        ratio = f"{entry['ratio_to_first']:.3f}" if entry["ratio_to_first"] else "-"
        print(f"{mode:16} {runs:32} {mean_text:>9} {ratio:>7}")


if __name__ == "__main__":
    main()
