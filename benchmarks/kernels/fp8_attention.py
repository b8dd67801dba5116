"""Decode attention over an fp8 KV cache, the two ways the kernel can multiply: widening
every key and value to fp16 first (the worker's way) against e4m3 products on the tensor
cores (`fp8_products`: the query and the probabilities rounded to e4m3 too); a bf16 cache
of the same values beside them. Llama-3.1-8B's heads (from --model-config), ragged
contexts, each launch a CUDA graph; tiles and pipeline stages swept for the e4m3 products.

    python -m benchmarks.kernels.fp8_attention --batches 16,32,64,128,256 --json fp8_attention.json

Prints µs per launch by batch size, and each variant's largest difference from the same
attention in fp32 over the cache's values (the e4m3 products' rounding shows there).
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.arguments import benchmark_parser
from benchmarks.kernels.decode_kernels import graph_ms
from gpu_worker.kernels.triton_decode_attention import decode_attention_triton
from gpu_worker.model.config import ModelConfig

LLAMA_CONFIG = Path(__file__).parents[1] / "configs" / "llama-3.1-8b.json"
BLOCK_SIZE = 16


def _paged_batch(contexts: list[int], num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Keys and values rounded to e4m3 in both caches (fp8, and bf16 of the same values),
    each sequence's blocks scattered over the pool."""
    blocks = [-(-n // BLOCK_SIZE) for n in contexts]
    num_blocks = sum(blocks)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    keys = (0.5 * torch.randn(shape, device="cuda")).to(torch.float8_e4m3fn)
    values = (0.5 * torch.randn(shape, device="cuda")).to(torch.float8_e4m3fn)
    order = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(contexts), max(blocks), dtype=torch.int32)
    start = 0
    for row, count in enumerate(blocks):
        tables[row, :count] = torch.tensor(order[start : start + count])
        start += count
    return {
        "fp8 keys": keys,
        # An fp8 value block is [head, dim, slot] (kernels/paged_attention.py).
        "fp8 values": values.permute(0, 2, 3, 1).contiguous(),
        "bf16 keys": keys.to(torch.bfloat16),
        "bf16 values": values.to(torch.bfloat16),
        "block tables": tables.cuda(),
        "seq lens": torch.tensor(contexts, dtype=torch.int32, device="cuda"),
    }


def time_batch(config: ModelConfig, contexts: list[int]) -> dict[str, Any]:
    head_dim = config.head_dim
    batch = _paged_batch(contexts, config.num_key_value_heads, head_dim)
    query = torch.randn(
        len(contexts), config.num_attention_heads, head_dim, device="cuda", dtype=torch.bfloat16
    )
    tables, seq_lens, scale = batch["block tables"], batch["seq lens"], head_dim**-0.5

    def fp8(**options: Any) -> torch.Tensor:
        return decode_attention_triton(
            query, batch["fp8 keys"], batch["fp8 values"], tables, seq_lens, scale, **options
        )

    exact = decode_attention_triton(
        query.float(), batch["bf16 keys"].float(), batch["bf16 values"].float(), tables, seq_lens, scale
    )
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "bf16 cache": lambda: decode_attention_triton(
            query, batch["bf16 keys"], batch["bf16 values"], tables, seq_lens, scale
        ),
        "fp8, widened to fp16": fp8,
        "fp8, e4m3 products": functools.partial(fp8, fp8_products=True),
    }
    for block_n, stages in itertools.product((64, 128), (1, 2, 3)):
        name = f"e4m3 products, {block_n} keys, {stages} stages"
        variants[name] = functools.partial(fp8, fp8_products=True, block_n=block_n, num_stages=stages)
    row: dict[str, Any] = {"sequences": len(contexts), "context tokens": sum(contexts)}
    for name, launch in variants.items():
        try:
            error = (launch().float() - exact).abs().max().item()
            row[name] = {"us": graph_ms(launch) * 1e3, "max_error": error}
        except Exception as failure:  # a launch that does not fit is listed, not fatal
            row[name] = {"error": str(failure)[:120]}
    return row


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, json_default="fp8_attention.json")
    parser.add_argument("--model-config", type=Path, default=LLAMA_CONFIG)
    parser.add_argument("--batches", default="16,32,64,128,256", help="comma-separated sequence counts")
    parser.add_argument("--min-context", type=int, default=200)
    parser.add_argument("--max-context", type=int, default=2000)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("fp8_attention needs a CUDA device")
    config = ModelConfig.from_dicts(json.loads(args.model_config.read_text()))
    rng = random.Random(0)
    torch.manual_seed(0)
    rows = []
    for num_seqs in map(int, args.batches.split(",")):
        contexts = [rng.randint(args.min_context, args.max_context) for _ in range(num_seqs)]
        row = time_batch(config, contexts)
        rows.append(row)
        print(f"{num_seqs} sequences, {row['context tokens']} context tokens: µs (largest difference)")
        for name, result in row.items():
            if isinstance(result, dict):
                text = result.get("error") or f"{result['us']:8.1f} ({result['max_error']:.3f})"
                print(f"  {name:44s} {text}")
    args.json.write_text(json.dumps({"model_config": str(args.model_config), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
