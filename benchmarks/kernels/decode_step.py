"""One decode step at a large batch against the memory roofline, and where its time goes.

    python -m benchmarks.kernels.decode_step --batch 256 --context 1000 --json decode_step.json
    python -m benchmarks.kernels.decode_step --model-config benchmarks/configs/llama-3.1-8b.json \
        --load-format dummy --quantization fp8 --kv-cache-dtype fp8

Builds the worker's model runner on Qwen3-0.6B's architecture (or --model-config's), with
random weights, quantized as serve's flags say, fills
the KV cache of `batch` sequences of `context` tokens with random values, and times the
decode forward (CUDA graph replay and eager), the LM head, and the attention kernel alone.
A decode step must read every weight once and every sequence's whole KV; that byte count
over the time is compared with the measured device-to-device copy bandwidth. A profiler
table of one eager step lists the kernels by GPU time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import triton.testing

from benchmarks.arguments import benchmark_parser
from benchmarks.kernels.cuda_runner import add_model_options, build_cuda_runner, model_options
from benchmarks.workload import QWEN3_CONFIG, kv_bytes_per_token, model_weight_bytes, write_random_model
from gpu_worker.kernels.triton_decode_attention import decode_attention_triton
from gpu_worker.model.attention import AttentionMetadata, attention_context
from gpu_worker.model_runner import ModelRunner


def copy_bandwidth(num_bytes: int = 4 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    seconds = (
        triton.testing.do_bench(lambda: target.copy_(source), warmup=50, rep=300, return_mode="median") / 1e3
    )
    return 2 * num_bytes / seconds


def fill_normal(storage: torch.Tensor, generator: torch.Generator) -> None:
    """Standard normal values in `storage`. torch has no normal_ for float8 (an fp8 KV
    cache): those are drawn in bf16 and rounded, one layer's keys or values at a time so
    that the bf16 draw stays a small part of the cache. Random bytes would not do: some
    are NaN in e4m3."""
    if storage.element_size() > 1:
        storage.normal_(generator=generator)
        return
    for part in storage.flatten(0, 1):
        part.copy_(torch.empty_like(part, dtype=torch.bfloat16).normal_(generator=generator))


def build_decode_batch(
    runner: ModelRunner, batch: int, context: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    block_size = runner.kv_cache.block_size
    blocks_per_seq = -(-(context + 1) // block_size)
    assert batch * blocks_per_seq <= runner.kv_cache.num_blocks, "KV cache too small for the batch"
    generator = torch.Generator(device="cuda").manual_seed(0)
    block_ids = torch.randperm(runner.kv_cache.num_blocks, device="cuda", generator=generator)
    block_tables = block_ids[: batch * blocks_per_seq].view(batch, blocks_per_seq).to(torch.int32)
    # Random KV in every block the batch reads: zeros would flatter the memory system.
    fill_normal(runner.kv_cache.storage, generator)
    positions = torch.full((batch,), context, dtype=torch.int64, device="cuda")
    slot_mapping = block_tables[:, context // block_size].long() * block_size + context % block_size
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.full((batch,), context + 1, dtype=torch.int32, device="cuda"),
        block_tables=block_tables,
        max_query_len=1,
        max_seq_len=context + 1,
    )
    input_ids = torch.randint(0, runner.model_config.vocab_size, (batch,), device="cuda", generator=generator)
    return input_ids, positions, metadata


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median")


def kernel_table(fn, top: int = 15) -> list[dict]:
    """The `top` kernels of one call of fn by device time. A kernel's time runs from its
    first program's start: launched early (programmatic dependent launch), it includes
    the wait for the kernel before, so a small kernel after a long one reads long (an
    add + RMSNorm of one row after a projection: 20-30 us). Compare whole steps."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for event in sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]:
        rows.append({"kernel": event.key[:90], "calls": event.count, "gpu_ms": event.device_time_total / 1e3})
    return rows


def _build_runner(args: argparse.Namespace) -> tuple[ModelRunner, float, int]:
    """The runner for the arguments' model, the bytes of its weights and its KV bytes per
    token."""
    # Bytes per projection weight; a 4-bit format's group scales and zeros left out.
    weight_element_bytes = {"int8": 1.0, "fp8": 1.0, "awq": 0.5, "gptq": 0.5}.get(args.quantization, 2.0)
    kv_element_bytes = 1 if args.kv_cache_dtype == "fp8" else 2
    with tempfile.TemporaryDirectory() as scratch:
        with_weights = args.load_format != "dummy"
        model_dir = write_random_model(args.model_config, Path(scratch) / "model", with_weights=with_weights)
        runner = build_cuda_runner(
            model_dir,
            max_num_seqs=args.batch,
            gpu_memory_utilization=args.gpu_memory_utilization,
            **model_options(args),
        )
        # The LM head stays in bf16 whatever the projections' quantization.
        lm_head_params = runner.model_config.vocab_size * runner.model_config.hidden_size
        weight_bytes = model_weight_bytes(model_dir, weight_element_bytes) + lm_head_params * (
            2 - weight_element_bytes
        )
        return runner, weight_bytes, kv_bytes_per_token(model_dir, kv_element_bytes)


def main() -> None:
    parser = benchmark_parser(__doc__, "decode_step.json")
    parser.add_argument("--model-config", type=Path, default=QWEN3_CONFIG)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    add_model_options(parser)
    args = parser.parse_args()

    results: dict = {"batch": args.batch, "context": args.context, "device": torch.cuda.get_device_name()}
    results["copy_bandwidth"] = bandwidth = copy_bandwidth()
    runner, weight_bytes, kv_token_bytes = _build_runner(args)
    input_ids, positions, metadata = build_decode_batch(runner, args.batch, args.context)
    model = runner.model

    def eager_forward() -> torch.Tensor:
        with attention_context(metadata):
            return model(input_ids, positions)

    def graph_step() -> torch.Tensor:
        hidden = runner.step_graphs[0].run(input_ids, positions, metadata)
        return model.compute_logits(hidden).argmax(dim=-1)

    hidden = eager_forward()
    with torch.inference_mode():
        timings = {
            "graph_forward_ms": time_ms(lambda: runner.step_graphs[0].run(input_ids, positions, metadata)),
            "graph_step_with_lm_head_argmax_ms": time_ms(graph_step),
            "eager_forward_ms": time_ms(eager_forward),
            "lm_head_ms": time_ms(lambda: model.compute_logits(hidden)),
        }
        config = runner.model_config
        query = torch.randn(
            args.batch, config.num_attention_heads, config.head_dim, dtype=torch.bfloat16, device="cuda"
        )
        layer = runner.model.attention_layers()[0]
        timings["attention_one_layer_ms"] = time_ms(
            lambda: decode_attention_triton(
                query,
                *layer.bound_kv_cache(),
                metadata.block_tables,
                metadata.seq_lens,
                config.head_dim**-0.5,
            )
        )
        results["eager_kernels"] = kernel_table(eager_forward)
    kv_bytes = args.batch * (args.context + 1) * kv_token_bytes
    step_bytes = weight_bytes + kv_bytes
    results |= timings
    results["weight_bytes"], results["kv_bytes"] = weight_bytes, kv_bytes
    seconds = timings["graph_step_with_lm_head_argmax_ms"] / 1e3
    results["step_bandwidth"] = step_bytes / seconds
    results["fraction_of_copy_bandwidth"] = step_bytes / seconds / bandwidth
    attention_bytes = kv_bytes / runner.model_config.num_hidden_layers
    results["attention_fraction_of_copy_bandwidth"] = (
        attention_bytes / (timings["attention_one_layer_ms"] / 1e3) / bandwidth
    )
    args.json.write_text(json.dumps(results, indent=2))
    print(
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; decode step batch {args.batch} x {args.context} tokens:"
    )
    for name, value in timings.items():
        print(f"  {name:38} {value:8.3f} ms")
    print(
        f"  reads {step_bytes / 1e9:.2f} GB -> {results['step_bandwidth'] / 1e12:.2f} TB/s = "
        f"{results['fraction_of_copy_bandwidth']:.1%} of copy bandwidth "
        f"(attention alone {results['attention_fraction_of_copy_bandwidth']:.1%})"
    )
    for row in results["eager_kernels"]:
        print(f"  {row['gpu_ms']:8.3f} ms {row['calls']:5d}x  {row['kernel']}")


if __name__ == "__main__":
    main()
