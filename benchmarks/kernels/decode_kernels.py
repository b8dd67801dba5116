"""The decode step's kernels against their floors: launch configurations of the paged
decode attention kernel, the projections' matmuls, and a whole step's time by batch size.

    python -m benchmarks.kernels.decode_kernels --json decode_kernels.json

- Bandwidth ceilings: a device-to-device copy (bytes read + written) and a read-only
  reduction, the ceiling of a kernel that only reads, as attention does.
- Decode attention over KV laid out as the worker lays it out, for uniform and for
  ragged contexts, in every launch configuration of the sweep; and (--parts splits) the
  number of context splits at the small batches of a run's tail.
- attention's o_proj and the MLP's down_proj of all layers with the add + RMSNorm that
  reads each (distinct weights, so L2 holds none of them), captured in one CUDA graph:
  cuBLAS against the split-K partial sums of kernels/triton_linear.py.
- The worker's decode graph at several batch sizes: what a step costs besides attention.
"""

from __future__ import annotations

import itertools
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton.testing

from benchmarks.arguments import benchmark_parser
from benchmarks.kernels.cuda_runner import build_cuda_runner
from benchmarks.kernels.decode_step import build_decode_batch, copy_bandwidth
from benchmarks.workload import QWEN3_CONFIG, write_random_model
from gpu_worker.kernels import triton_linear
from gpu_worker.kernels.triton_decode_attention import decode_attention_triton
from gpu_worker.model.attention import attention_context

BLOCK_SIZE, NUM_KV_HEADS, NUM_HEADS, HEAD_DIM, NUM_LAYERS = 16, 8, 16, 128, 28
# (name, out_features, in_features) of Qwen3-0.6B's projections that an add + RMSNorm reads.
NORM_FED_PROJECTIONS = (("o", 1024, 2048), ("down", 1024, 3072))


def read_bandwidth(num_bytes: int = 4 << 30) -> float:
    source = torch.randn(num_bytes // 4, device="cuda")
    seconds = triton.testing.do_bench(lambda: source.sum(), warmup=50, rep=300, return_mode="median") / 1e3
    return num_bytes / seconds


def graph_ms(fn, rep_ms: int = 50) -> float:
    """Median time of one call of fn, captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")


def attention_cases() -> dict[str, list[int]]:
    rng = random.Random(0)
    return {
        "256x1000": [1000] * 256,
        "256 ragged 200-2000": [rng.randint(200, 2000) for _ in range(256)],
        "128 ragged 600-2000": [rng.randint(600, 2000) for _ in range(128)],
        "32 ragged 1000-2000": [rng.randint(1000, 2000) for _ in range(32)],
    }


def attention_sweep(bandwidth_read: float) -> list[dict]:
    cases = attention_cases()
    max_blocks = max(len(contexts) * -(-max(contexts) // BLOCK_SIZE) for contexts in cases.values())
    shape = (max_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    value_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    rows = []
    for case, contexts in cases.items():
        width = max(-(-n // BLOCK_SIZE) for n in contexts)
        order = torch.randperm(max_blocks, device="cuda")
        block_tables = order[: len(contexts) * width].view(len(contexts), width).to(torch.int32)
        seq_lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")
        query = torch.randn(len(contexts), NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        kv_bytes = sum(contexts) * NUM_KV_HEADS * HEAD_DIM * 2 * 2
        configs: list[dict[str, Any]] = [
            dict(block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits)
            for block_n, warps, stages, splits in itertools.product(
                (32, 64, 128), (4, 8), (2, 3, 4), (None, 2)
            )
        ]
        for config in [{}, *configs]:  # {}: the kernel's own choices
            try:
                ms = graph_ms(
                    lambda: decode_attention_triton(
                        query, key_cache, value_cache, block_tables, seq_lens, HEAD_DIM**-0.5, **config
                    )
                )
            except Exception as error:  # a configuration that does not fit is skipped
                rows.append({"case": case, **config, "error": str(error)[:80]})
                continue
            rows.append(
                {
                    "case": case,
                    **(config or {"default": True}),
                    "ms": ms,
                    "read_fraction": kv_bytes / (ms / 1e3) / bandwidth_read,
                }
            )
    return rows


def split_sweep(bandwidth_read: float) -> list[dict]:
    """Context splits per sequence at the batch sizes of a run's tail, where sequences
    alone are too few programs to fill the device."""
    rng = random.Random(1)
    batches = (1, 4, 16, 32, 64, 128)
    max_blocks = max(batches) * -(-2000 // BLOCK_SIZE)
    shape = (max_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    value_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    rows = []
    for batch in batches:
        contexts = [rng.randint(600, 2000) for _ in range(batch)]
        width = -(-2000 // BLOCK_SIZE)
        block_tables = (
            torch.randperm(max_blocks, device="cuda")[: batch * width].view(batch, width).to(torch.int32)
        )
        seq_lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")
        query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        kv_bytes = sum(contexts) * NUM_KV_HEADS * HEAD_DIM * 2 * 2
        configs: list[dict[str, Any]] = [
            dict(block_n=block_n, num_splits=splits)
            for splits, block_n in itertools.product((None, 1, 2, 4, 8, 16, 32), (32, 64))
        ]
        for config in [{}, *configs]:  # {}: the kernel's own choices
            ms = graph_ms(
                lambda: decode_attention_triton(
                    query, key_cache, value_cache, block_tables, seq_lens, HEAD_DIM**-0.5, **config
                )
            )
            rows.append(
                {
                    "batch": batch,
                    **(config or {"default": True}),
                    "ms": ms,
                    "read_fraction": kv_bytes / (ms / 1e3) / bandwidth_read,
                }
            )
    return rows


def projection_table() -> list[dict]:
    """o_proj and down_proj with the add + RMSNorm that reads them, all layers in one graph:
    cuBLAS then the norm, against split-K partial sums that the norm adds up."""
    from gpu_worker.kernels.triton_elementwise import add_rms_norm_triton
    from gpu_worker.kernels.triton_linear import linear_partial_sums, split_k_plan

    norm_weight = torch.ones(1024, dtype=torch.bfloat16, device="cuda")
    rows = []
    for name, n, k in NORM_FED_PROJECTIONS:
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(NUM_LAYERS)]
        for batch in (1, 16, 32, 64, 128, 256):
            x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
            residual = torch.randn(batch, n, dtype=torch.bfloat16, device="cuda")

            def layers(project):
                for weight in weights:
                    add_rms_norm_triton(project(x, weight), residual, norm_weight, 1e-6)

            row: dict[str, Any] = {
                "projection": name,
                "batch": batch,
                "cublas_ms": graph_ms(lambda: layers(torch.nn.functional.linear)),
            }
            plan = split_k_plan(batch, n, k)
            if plan is not None:
                row["plan"] = plan
                row["plan_ms"] = graph_ms(lambda: layers(lambda a, w: linear_partial_sums(a, w, **plan)))
            rows.append(row)
            if batch not in (16, 64, 128):
                continue
            block_m = min(64, max(16, triton.next_power_of_2(batch)))
            sweep = []
            for block_n, splits, stages in itertools.product((32, 64), (1, 2, 3, 4, 6, 8), (3, 5)):
                if (k // 128) % splits:
                    continue
                config = dict(num_splits=splits, block_m=block_m, block_n=block_n, num_stages=stages)
                try:
                    ms = graph_ms(lambda: layers(lambda a, w: linear_partial_sums(a, w, **config)), rep_ms=30)
                except Exception:  # a configuration that does not fit is skipped
                    continue
                sweep.append((ms, config))
            sweep.sort(key=lambda item: item[0])
            row["best"] = [{"ms": ms, **config} for ms, config in sweep[:5]]
    return rows


def step_by_batch(model_config: Path) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_random_model(model_config, Path(scratch) / "model")
        runner = build_cuda_runner(model_dir, max_num_seqs=256, gpu_memory_utilization=0.5)
    for batch in (1, 16, 64, 128, 256):
        input_ids, positions, metadata = build_decode_batch(runner, batch, 1000)
        layer = runner.model.attention_layers()[0]
        query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        with torch.inference_mode():
            step = triton.testing.do_bench(
                lambda: runner.step_graphs[0].run(input_ids, positions, metadata),
                warmup=20,
                rep=200,
                return_mode="median",
            )
            attention = graph_ms(
                lambda: decode_attention_triton(
                    query,
                    *layer.bound_kv_cache(),
                    metadata.block_tables,
                    metadata.seq_lens,
                    HEAD_DIM**-0.5,
                )
            )
            graph_hidden = runner.step_graphs[0].run(input_ids, positions, metadata).float()
            # The same step eagerly with cuBLAS projections: split-K must change nothing
            # beyond rounding.
            limit, triton_linear.MAX_SPLIT_K_ROWS = triton_linear.MAX_SPLIT_K_ROWS, 0
            try:
                with attention_context(metadata):
                    plain_hidden = runner.model(input_ids, positions).float()
            finally:
                triton_linear.MAX_SPLIT_K_ROWS = limit
        rows.append(
            {
                "batch": batch,
                "graph_forward_ms": step,
                "attention_all_layers_ms": attention * NUM_LAYERS,
                "rest_ms": step - attention * NUM_LAYERS,
                "hidden_rel_error_vs_cublas": (
                    (graph_hidden - plain_hidden).norm() / plain_hidden.norm()
                ).item(),
            }
        )
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__, "decode_kernels.json")
    parser.add_argument("--model-config", type=Path, default=QWEN3_CONFIG)
    parser.add_argument("--parts", default="bandwidth,attention,projections,steps")
    args = parser.parse_args()
    parts = args.parts.split(",")
    results: dict = {"device": torch.cuda.get_device_name()}
    results["copy_bandwidth"] = copy_bandwidth()
    results["read_bandwidth"] = read_bandwidth()
    print(
        f"copy {results['copy_bandwidth'] / 1e12:.2f} TB/s, read {results['read_bandwidth'] / 1e12:.2f} TB/s"
    )
    if "attention" in parts:
        rows = results["attention"] = attention_sweep(results["read_bandwidth"])
        args.json.write_text(json.dumps(results, indent=2))
        for case in attention_cases():
            timed = sorted((r for r in rows if r["case"] == case and "ms" in r), key=lambda r: r["ms"])
            default = next(r for r in timed if r.get("default"))
            print(
                f"attention {case}: default {default['ms']:.3f} ms ({default['read_fraction']:.1%} of read bw)"
            )
            for r in [r for r in timed if not r.get("default")][:4]:
                print(
                    f"   {r['ms']:.3f} ms {r['read_fraction']:.1%} n={r['block_n']} w={r['num_warps']} "
                    f"s={r['num_stages']} splits={r['num_splits']}"
                )
    if "splits" in parts:
        rows = results["splits"] = split_sweep(results["read_bandwidth"])
        for batch in sorted({r["batch"] for r in rows}):
            timed = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["ms"])
            default = next(r for r in timed if r.get("default"))
            print(
                f"splits, batch {batch:3d}: default {default['ms']:.4f} ms ({default['read_fraction']:.1%}); best "
                + "; ".join(
                    f"{r['ms']:.4f} ms {r['read_fraction']:.1%} splits={r['num_splits']} n={r['block_n']}"
                    for r in [r for r in timed if not r.get("default")][:3]
                )
            )
    if "projections" in parts:
        results["projections"] = projection_table()
        args.json.write_text(json.dumps(results, indent=2))
        for row in results["projections"]:
            print(
                f"{row['projection']:5} + norm, batch {row['batch']:3d}: cuBLAS {row['cublas_ms']:.3f} ms, "
                f"plan {row.get('plan_ms', float('nan')):.3f} ms, best {row.get('best', [None])[0]}"
            )
    if "steps" in parts:
        results["steps"] = step_by_batch(args.model_config)
        for row in results["steps"]:
            print(
                f"decode graph batch {row['batch']:3d}: {row['graph_forward_ms']:.3f} ms, attention "
                f"{row['attention_all_layers_ms']:.3f}, rest {row['rest_ms']:.3f}, "
                f"hidden vs cuBLAS {row['hidden_rel_error_vs_cublas']:.2e}"
            )
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
