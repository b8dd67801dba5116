"""A mixed prefill step at the scheduler's token budget: the paged prefill kernel's launch
configurations against each other and against the varlen kernel, and where a whole
forward's time goes.

    python -m benchmarks.kernels.prefill_step --json prefill_step.json

The batch is what the throughput benchmark's early steps look like: new prompts filling
max_num_batched_tokens next to sequences decoding over long contexts.
"""

from __future__ import annotations

import itertools
import json
import random
import tempfile
from pathlib import Path

import torch
import triton.testing

from benchmarks.arguments import benchmark_parser
from benchmarks.kernels.cuda_runner import add_model_options, build_cuda_runner, model_options
from benchmarks.kernels.decode_step import fill_normal, kernel_table
from benchmarks.workload import QWEN3_CONFIG, write_random_model
from gpu_worker.kernels.attention_backend import fresh_prefill_kernel
from gpu_worker.kernels.triton_prefill_attention import prefill_attention_triton
from gpu_worker.model.attention import AttentionMetadata, attention_context

BLOCK_SIZE = 16


def mixed_batch(prompt_lens: list[int], decode_contexts: list[int], num_kv_heads: int, device: str):
    """Metadata of decodes (first, as the scheduler orders them) then fresh prompts."""
    seq_lens = decode_contexts + prompt_lens
    query_lens = [1] * len(decode_contexts) + prompt_lens
    blocks_needed = [-(-n // BLOCK_SIZE) for n in seq_lens]
    order = list(range(sum(blocks_needed)))
    random.Random(0).shuffle(order)
    tables: list[list[int]] = []
    slots: list[int] = []
    offset = 0
    for seq_len, query_len, count in zip(seq_lens, query_lens, blocks_needed):
        table = order[offset : offset + count]
        offset += count
        tables.append(table)
        slots.extend(
            table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len - query_len, seq_len)
        )
    width = max(blocks_needed)
    query_start_loc = [0]
    for n in query_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device
        ),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    ), len(order)


def attention_results(
    metadata: AttentionMetadata, num_blocks: int, prompt_lens: list[int], num_decodes: int
) -> dict:
    """One layer's paged prefill attention over the mixed batch: every launch configuration
    of the sweep, the kernel's own choice, and the varlen kernel on the prompts alone."""
    num_tokens = int(metadata.query_start_loc[-1])
    cache_shape = (num_blocks, BLOCK_SIZE, 8, 128)
    key_cache = torch.randn(cache_shape, dtype=torch.bfloat16, device="cuda")
    value_cache = torch.randn(cache_shape, dtype=torch.bfloat16, device="cuda")
    query = torch.randn(num_tokens, 16, 128, dtype=torch.bfloat16, device="cuda")
    results: dict = {}

    def run(**config):
        return prefill_attention_triton(
            query,
            key_cache,
            value_cache,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            128**-0.5,
            **config,
        )

    sweep = []
    for block_m, block_n, warps, stages in itertools.product((32, 64), (32, 64, 128), (4, 8), (1, 2, 3)):
        config: dict[str, int | str] = dict(
            block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages
        )
        try:
            ms = triton.testing.do_bench(lambda: run(**config), warmup=10, rep=50, return_mode="median")
        except Exception as error:  # a configuration that does not fit is just skipped
            ms = None
            config["error"] = str(error)[:100]
        sweep.append({**config, "ms": ms})
    sweep.sort(key=lambda row: row["ms"] if row["ms"] is not None else 1e9)
    results["paged_prefill_sweep"] = sweep
    results["paged_prefill_default_ms"] = triton.testing.do_bench(lambda: run(), return_mode="median")
    fresh = fresh_prefill_kernel()
    if fresh is not None:
        prompt_query = query[int(metadata.query_start_loc[num_decodes]) :]
        keys = torch.randn(prompt_query.shape[0], 8, 128, dtype=torch.bfloat16, device="cuda")
        cu = (metadata.query_start_loc[num_decodes:] - metadata.query_start_loc[num_decodes]).contiguous()
        results["varlen_prompts_only_ms"] = triton.testing.do_bench(
            lambda: fresh(prompt_query, keys, keys, cu, max(prompt_lens), 128**-0.5), return_mode="median"
        )
    return results


def forward_results(model_config: Path, metadata: AttentionMetadata, **worker_options: object) -> dict:
    """The whole model's eager forward over the mixed batch: its time and its kernels.
    worker_options: WorkerConfig's quantization, kv_cache_dtype and load_format."""
    num_tokens = int(metadata.query_start_loc[-1])
    with tempfile.TemporaryDirectory() as scratch:
        with_weights = worker_options.get("load_format") != "dummy"
        model_dir = write_random_model(model_config, Path(scratch) / "model", with_weights=with_weights)
        runner = build_cuda_runner(
            model_dir, gpu_memory_utilization=0.5, enforce_eager=True, **worker_options
        )
    fill_normal(runner.kv_cache.storage, torch.Generator(device="cuda").manual_seed(0))
    input_ids = torch.randint(0, 10000, (num_tokens,), device="cuda")
    positions = torch.cat(
        [
            torch.arange(int(s) - int(q), int(s), device="cuda")
            for s, q in zip(
                metadata.seq_lens.tolist(),
                (metadata.query_start_loc[1:] - metadata.query_start_loc[:-1]).tolist(),
            )
        ]
    )

    def forward():
        with torch.inference_mode(), attention_context(metadata):
            return runner.model(input_ids, positions)

    return {
        "mixed_forward_ms": triton.testing.do_bench(forward, warmup=5, rep=50, return_mode="median"),
        "mixed_forward_kernels": kernel_table(forward, top=12),
    }


def main() -> None:
    parser = benchmark_parser(__doc__, "prefill_step.json")
    parser.add_argument("--model-config", type=Path, default=QWEN3_CONFIG)
    # For the whole forward; the attention sweep keeps bf16.
    add_model_options(parser)
    args = parser.parse_args()
    rng = random.Random(0)
    prompt_lens: list[int] = []
    while sum(prompt_lens) < 8192 - 1024:
        prompt_lens.append(rng.randint(100, 1024))
    decode_contexts = [rng.randint(100, 1024) for _ in range(128)]
    metadata, num_blocks = mixed_batch(prompt_lens, decode_contexts, 8, "cuda")
    num_tokens = int(metadata.query_start_loc[-1])
    results: dict = {
        "num_tokens": num_tokens,
        "num_prompts": len(prompt_lens),
        "num_decodes": len(decode_contexts),
        **attention_results(metadata, num_blocks, prompt_lens, len(decode_contexts)),
        **forward_results(args.model_config, metadata, **model_options(args)),
    }
    args.json.write_text(json.dumps(results, indent=2))
    print(f"mixed step: {num_tokens} tokens ({len(prompt_lens)} prompts, {len(decode_contexts)} decodes)")
    print(
        f"  forward {results['mixed_forward_ms']:.2f} ms; paged prefill attention one layer: "
        f"default {results['paged_prefill_default_ms']:.3f} ms, varlen (prompts only) {results.get('varlen_prompts_only_ms')}"
    )
    for row in results["paged_prefill_sweep"][:6]:
        print("  ", row)
    for row in results["mixed_forward_kernels"]:
        print(f"  {row['gpu_ms']:8.3f} ms {row['calls']:5d}x  {row['kernel']}")


if __name__ == "__main__":
    main()
