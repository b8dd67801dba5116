"""The 4-bit decode kernels' launch parameters, swept on Llama-3.1-8B's projections.

    python -m benchmarks.kernels.int4_tiles --kernel gemv --json int4_tiles.json
    python -m benchmarks.kernels.int4_tiles --kernel gemv --block-n 64 --block-k 128 --warps 4 --stages 1,2,3,4
    python -m benchmarks.kernels.int4_tiles --kernel split-k --rows 16,32,64 --no-sweep

For each projection (qkv, o_proj, gate_up, down; group size 128) and row count, every
plan in a grid of tile sizes, input slices, warps and stages is timed with Triton's
do_bench_cudagraph: a CUDA graph of launches, as the worker replays them, so that a
kernel of a few microseconds is not hidden behind its Python launch. Each launch reads
other weights than the last, from memory rather than the L2 cache. Beside it, bf16's
F.linear on the same shape, the dequantize-then-GEMM path that takes many rows, and the
plan the worker picks today (alone with --no-sweep); --block-n, --block-k, --warps and
--stages narrow the grid (the gemv kernel's stages pipeline its loop's loads; 1: none).
Prints, per shape, the worker's plan and the best found, with the TB/s at which each read
the 4-bit weights; the JSON holds the best few.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from benchmarks.arguments import benchmark_parser
from gpu_worker.kernels.triton_int4_dequantize import dequantize_int4_triton
from gpu_worker.kernels.triton_int4_gemv import int4_gemv_plan, int4_gemv_triton
from gpu_worker.kernels.triton_int4_linear import int4_linear_grouped_triton, int4_split_k_plan

# (in_features, out_features) of Llama-3.1-8B's four projections.
LLAMA_8B_PROJECTIONS = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))
GROUP_SIZE = 128
# Each kernel and the plan the worker picks for (out_features, in_features, group, rows).
KERNELS: dict[
    str, tuple[Callable[..., torch.Tensor], Callable[[int, int, int, int], dict[str, int] | None]]
] = {
    "gemv": (int4_gemv_triton, lambda out, in_, group, rows: int4_gemv_plan(out, in_, group)),
    "split-k": (int4_linear_grouped_triton, int4_split_k_plan),
}
KEEP = 5
# Bytes of weights each timed launch cycles through: over twice an H200's 60 MB L2.
L2_FLUSH_BYTES = 256e6


@dataclass(frozen=True)
class Grid:
    """The launch parameters a sweep tries, each in every combination."""

    block_n: tuple[int, ...] = (64, 128, 256)
    block_k: tuple[int, ...] = (64, 128)
    warps: tuple[int, ...] = (2, 4, 8)
    stages: tuple[int, ...] = (2, 4)


def _plans(in_features: int, out_features: int, rows: int, grid: Grid) -> list[dict[str, int]]:
    """The grid: tiles within one group, 1-16 input slices dividing the tiles, and only
    launches of at least one program per multiprocessor's worth (132) of work; one tile of
    rows (the split-K kernel's; the gemv kernel takes one row and ignores it)."""
    block_m = max(16, triton.next_power_of_2(rows))
    plans = []
    for block_n, block_k, warps, stages in itertools.product(
        grid.block_n, grid.block_k, grid.warps, grid.stages
    ):
        k_tiles = in_features // block_k
        for splits in (s for s in (1, 2, 4, 8, 16) if k_tiles % s == 0):
            if (out_features // block_n) * splits >= 132:
                plans.append(
                    {
                        "block_m": block_m,
                        "block_k": block_k,
                        "block_n": block_n,
                        "num_splits": splits,
                        "num_warps": warps,
                        "num_stages": stages,
                    }
                )
    return plans


def _ms(fn: Callable[[], object]) -> float:
    return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))


def sweep_shape(
    kernel: str, in_features: int, out_features: int, rows: int, grid: Grid | None
) -> dict[str, object]:
    """The worker's plan, bf16's F.linear and the dequantize-then-GEMM path on one shape;
    with a grid, every plan of it too."""
    launch, worker_plan = KERNELS[kernel]
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
    groups = in_features // GROUP_SIZE
    # The 4-bit weights and one bf16 scale and zero per group and column.
    gigabytes = (in_features * out_features // 2 + groups * out_features * 4) / 1e9
    # Enough copies of the weights that each launch reads them from memory, not from the
    # L2 cache, as in a decode step where every layer's weights differ.
    copies = max(1, math.ceil(L2_FLUSH_BYTES / (gigabytes * 1e9)))
    quantized = [
        (
            torch.randint(
                -(2**31), 2**31 - 1, (in_features // 8, out_features), device="cuda", dtype=torch.int32
            ),
            torch.rand(groups, out_features, device="cuda").to(torch.bfloat16) * 0.01,
            torch.full((groups, out_features), 8.0, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(copies)
    ]
    bf16_weights = [
        torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
        for _ in range(max(1, copies // 4))
    ]

    def per_launch_ms(plan: dict[str, int] | None) -> float:
        def every_copy() -> None:
            for qweight, scales, zeros in quantized:
                launch(x, qweight, scales, zeros, GROUP_SIZE, plan)

        return _ms(every_copy) / copies

    timed: list[tuple[float, dict[str, int]]] = []
    for plan in _plans(in_features, out_features, rows, grid) if grid else []:
        try:
            timed.append((per_launch_ms(plan), plan))
        except (ValueError, triton.runtime.errors.OutOfResources):
            continue
    default = worker_plan(out_features, in_features, GROUP_SIZE, rows)
    if default is None:
        raise SystemExit(f"{kernel}: no plan for {in_features}x{out_features} at {rows} rows")
    default_ms = per_launch_ms(default)
    timed.append((default_ms, default))
    timed.sort(key=lambda entry: entry[0])
    bf16_ms = _ms(lambda: [F.linear(x, weight) for weight in bf16_weights]) / len(bf16_weights)
    g_idx = torch.arange(in_features, device="cuda", dtype=torch.int32) // GROUP_SIZE

    def dequantize_then_gemm() -> None:
        for qweight, scales, zeros in quantized:
            F.linear(x, dequantize_int4_triton(qweight, scales, zeros, g_idx, x.dtype).t())

    dequantize_ms = _ms(dequantize_then_gemm) / copies
    return {
        "shape": [in_features, out_features],
        "rows": rows,
        "bf16_ms": bf16_ms,
        "dequantize_then_gemm_ms": dequantize_ms,
        "default_plan": default,
        "default_ms": default_ms,
        "default_tbps": gigabytes / default_ms,
        "best_tbps": gigabytes / timed[0][0],
        "top": timed[:KEEP],
    }


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main() -> None:
    parser = benchmark_parser(__doc__, "int4_tiles.json")
    parser.add_argument("--kernel", choices=sorted(KERNELS), default="gemv")
    parser.add_argument("--rows", default="1", help="comma-separated row counts (gemv: 1 only)")
    parser.add_argument("--no-sweep", action="store_true", help="time the worker's plan only")
    parser.add_argument("--block-n", type=_numbers, default=Grid.block_n, help="column tiles to try")
    parser.add_argument("--block-k", type=_numbers, default=Grid.block_k, help="input tiles to try")
    parser.add_argument("--warps", type=_numbers, default=Grid.warps, help="warps a program to try")
    parser.add_argument("--stages", type=_numbers, default=Grid.stages, help="pipeline stages to try")
    args = parser.parse_args()
    grid = None if args.no_sweep else Grid(args.block_n, args.block_k, args.warps, args.stages)
    row_counts = [int(r) for r in args.rows.split(",")]
    if args.kernel == "gemv" and row_counts != [1]:
        raise SystemExit(f"--rows {args.rows}: the gemv kernel takes one row only")
    results = []
    print(
        "| shape | rows | bf16 ms | dequantize + GEMM ms | worker's plan ms | TB/s | best ms | TB/s | best plan |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for rows in row_counts:
        for in_features, out_features in LLAMA_8B_PROJECTIONS:
            result = sweep_shape(args.kernel, in_features, out_features, rows, grid)
            results.append(result)
            best_ms, best_plan = result["top"][0]  # type: ignore[index]
            print(
                f"| {in_features}x{out_features} | {rows} | {result['bf16_ms']:.4f} "
                f"| {result['dequantize_then_gemm_ms']:.4f} | {result['default_ms']:.4f} "
                f"| {result['default_tbps']:.2f} | {best_ms:.4f} | {result['best_tbps']:.2f} | {best_plan} |",
                flush=True,
            )
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
