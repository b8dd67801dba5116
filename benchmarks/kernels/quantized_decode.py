"""The decode step in each quantization mode, side by side, on Llama-3.1-8B's shapes.

    python -m benchmarks.kernels.quantized_decode --modes bf16,fp8,awq,fp8+fp8-kv,fp8-kv \\
        --batches 1,32,256 --context 1000 --json quantized_decode.json

For each mode, one worker model runner on CUDA with random weights made on the device
(load_format "dummy": no checkpoint is written or read), one after the other, each freed
before the next is built. A mode is "bf16" (unquantized), a --quantization method (fp8,
int8, awq, gptq; the 4-bit ones with their default group size), "fp8-kv" (an fp8 KV
cache), or several joined by "+" (fp8+fp8-kv). At each batch size, every sequence
`context` tokens long with random KV, the time of one decode step as the worker takes it:
the decode CUDA graph's replay, then the LM head and the argmax. The table gives ms per
step and the speed-up over bf16; the JSON also the weights' bytes and the cache's size.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.arguments import benchmark_parser
from benchmarks.device import release_memory
from benchmarks.kernels.cuda_runner import MAX_MODEL_LEN, build_cuda_runner
from benchmarks.kernels.decode_step import build_decode_batch, kernel_table, time_ms
from benchmarks.workload import write_random_model
from gpu_worker.model.quantization.config import QUANTIZATION_METHODS
from gpu_worker.model_runner import ModelRunner

LLAMA_8B_CONFIG = Path(__file__).parents[1] / "configs" / "llama-3.1-8b.json"
DEFAULT_MODES = "bf16,fp8,awq,fp8+fp8-kv,fp8-kv"


def worker_options(mode: str) -> dict[str, str]:
    """The WorkerConfig fields a mode sets."""
    options: dict[str, str] = {}
    for part in mode.split("+"):
        if part == "fp8-kv":
            options["kv_cache_dtype"] = "fp8"
        elif part in QUANTIZATION_METHODS:
            options["quantization"] = part
        elif part != "bf16":
            raise SystemExit(
                f"unknown mode part {part!r} in {mode!r}: bf16, fp8-kv or one of {QUANTIZATION_METHODS}"
            )
    return options


def held_bytes(module: torch.nn.Module) -> int:
    """What the model holds on the device once quantized: packed weights, scales, zeros."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_step(runner: ModelRunner, batch: int, context: int) -> Callable[[], torch.Tensor]:
    input_ids, positions, metadata = build_decode_batch(runner, batch, context)
    model, graphs = runner.model, runner.step_graphs[0]

    def graph_step() -> torch.Tensor:
        # As the worker's decode step: graph replay, then logits and greedy sampling.
        hidden = graphs.run(input_ids, positions, metadata)
        return model.compute_logits(hidden).argmax(dim=-1)

    return graph_step


def step_ms(runner: ModelRunner, batch: int, context: int) -> float:
    with torch.inference_mode():
        return time_ms(decode_step(runner, batch, context))


def measure_mode(
    model_dir: Path, mode: str, batches: list[int], context: int, utilization: float, kernels_at: int | None
) -> dict:
    runner = build_cuda_runner(
        model_dir,
        load_format="dummy",
        max_num_seqs=max(batches),
        gpu_memory_utilization=utilization,
        # The swap pool is pinned host memory that no step here touches.
        swap_space_bytes=0,
        **worker_options(mode),
    )
    try:
        assert runner.step_graphs, "the runner captured no decode graphs"
        return {
            "options": worker_options(mode),
            "weight_bytes": held_bytes(runner.model),
            "kv_cache_dtype": str(runner.kv_cache.storage.dtype).removeprefix("torch."),
            "num_kv_blocks": runner.kv_cache.num_blocks,
            "step_ms": {str(batch): step_ms(runner, batch, context) for batch in batches},
            "kernels": kernel_table(decode_step(runner, kernels_at, context), top=12) if kernels_at else [],
        }
    finally:
        # The graphs' pool and the cache go with the runner; the next mode needs the room.
        del runner
        release_memory("cuda")


def add_speedups(modes: dict[str, dict]) -> None:
    baseline = modes.get("bf16", {}).get("step_ms")
    for entry in modes.values():
        if baseline and "step_ms" in entry:
            entry["speedup_over_bf16"] = {b: baseline[b] / ms for b, ms in entry["step_ms"].items()}


def print_table(results: dict) -> None:
    batches = [str(b) for b in results["batches"]]
    print(
        f"\n{results['device']}, {results['model_config']}, context {results['context']}: "
        "ms per decode step (graph + LM head + argmax), speed-up over bf16\n"
    )
    print("| mode | weights GB | " + " | ".join(f"batch {b} ms | x bf16" for b in batches) + " |")
    print("| --- | ---: | " + " | ".join("---: | ---:" for _ in batches) + " |")
    for mode, entry in results["modes"].items():
        if "error" in entry:
            print(f"| {mode} | failed: {entry['error']} |")
            continue
        speedups = entry.get("speedup_over_bf16", {})
        cells = [
            f"{entry['step_ms'][b]:.3f} | " + (f"{speedups[b]:.2f}" if b in speedups else "-")
            for b in batches
        ]
        print(f"| {mode} | {entry['weight_bytes'] / 1e9:.2f} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = benchmark_parser(__doc__, "quantized_decode.json")
    parser.add_argument("--model-config", type=Path, default=LLAMA_8B_CONFIG)
    parser.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated; see above")
    parser.add_argument("--batches", default="1,32,256", help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=1000, help="tokens already in each sequence")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--device", default="cuda", choices=["cuda"], help="CUDA graphs need a GPU")
    parser.add_argument(
        "--kernel-table",
        type=int,
        default=None,
        metavar="BATCH",
        help="each mode's top kernels at this batch",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("quantized_decode replays CUDA graphs: it needs a CUDA device, and none is visible")
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    for mode in modes:
        worker_options(mode)  # an unknown mode fails now, not after the first runs
    if args.context + 1 > MAX_MODEL_LEN:
        raise SystemExit(f"--context {args.context}: the runner serves at most {MAX_MODEL_LEN} tokens")

    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m benchmarks.kernels.quantized_decode", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model_config": args.model_config.name,
        "context": args.context,
        "batches": batches,
        "modes": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        # config.json and a tokenizer only: each runner makes its own weights.
        model_dir = write_random_model(args.model_config, Path(scratch) / "model", with_weights=False)
        for mode in modes:
            print(f"mode {mode} ...", file=sys.stderr, flush=True)
            try:
                entry = measure_mode(
                    model_dir, mode, batches, args.context, args.gpu_memory_utilization, args.kernel_table
                )
            except Exception as error:  # one mode that fails must not lose the others' numbers
                traceback.print_exc()
                entry = {"options": worker_options(mode), "error": f"{type(error).__name__}: {error}"[:300]}
            # Out here, where the error's frames (a half-built runner's among them) are gone.
            release_memory("cuda")
            results["modes"][mode] = entry
            print(f"  {entry.get('step_ms', entry.get('error'))}", file=sys.stderr, flush=True)
            for row in entry.get("kernels", []):
                print(f"    {row['gpu_ms']:8.3f} ms {row['calls']:4d}x {row['kernel']}", file=sys.stderr)
    add_speedups(results["modes"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
