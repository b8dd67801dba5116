"""Steps that serve online load, replayed as the worker replays them: decode steps of a
few dozen sequences, and the same decodes beside one prompt, which replay a prefill graph
(gpu_worker/prefill_graphs.py). What the prompt adds to a decode step is the gap every
stream sees at that step, the inter-token latency's tail.

    python -m benchmarks.kernels.mixed_graphs --json mixed_graphs.json

Decode contexts are U[200, 1,400] tokens (seeded), as sequences halfway through the
nano-vllm workload's outputs; the prompts are fresh.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch
import triton.testing

from benchmarks.arguments import benchmark_parser
from benchmarks.kernels.cuda_runner import build_cuda_runner
from benchmarks.kernels.decode_step import fill_normal, kernel_table
from benchmarks.kernels.prefill_step import mixed_batch
from benchmarks.workload import QWEN3_CONFIG, write_random_model
from gpu_worker.model_runner import ModelRunner

DECODES = (8, 15, 18, 40, 60, 100)
PROMPTS = (128, 400)


def _batch(runner: ModelRunner, rng: random.Random, num_decodes: int, prompts: list[int]):
    contexts = [rng.randint(200, 1400) for _ in range(num_decodes)]
    metadata, num_blocks = mixed_batch(prompts, contexts, runner.model_config.num_key_value_heads, "cuda")
    assert num_blocks <= runner.kv_cache.num_blocks, "KV cache too small for the batch"
    num_tokens = int(metadata.query_start_loc[-1])
    query_lens = (metadata.query_start_loc[1:] - metadata.query_start_loc[:-1]).tolist()
    positions = torch.cat(
        [
            torch.arange(seq_len - query_len, seq_len, device="cuda")
            for seq_len, query_len in zip(metadata.seq_lens.tolist(), query_lens)
        ]
    )
    return torch.randint(0, 10000, (num_tokens,), device="cuda"), positions, metadata


def main() -> None:
    parser = benchmark_parser(__doc__, "mixed_graphs.json")
    parser.add_argument("--model-config", type=Path, default=QWEN3_CONFIG)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_random_model(args.model_config, Path(scratch) / "model")
        runner = build_cuda_runner(model_dir, max_num_seqs=256, gpu_memory_utilization=0.4)
    fill_normal(runner.kv_cache.storage, torch.Generator(device="cuda").manual_seed(0))
    rng = random.Random(0)
    results: dict = {"device": torch.cuda.get_device_name(), "steps": {}}
    with torch.inference_mode():
        for num_decodes in DECODES:
            for prompts in ([], *([length] for length in PROMPTS)):
                input_ids, positions, metadata = _batch(runner, rng, num_decodes, prompts)
                graphs = next(g for g in runner.step_graphs if g.can_run(metadata))

                def replay() -> torch.Tensor:
                    return graphs.run(input_ids, positions, metadata)

                name = f"{num_decodes} decodes" + "".join(f" + {length}-token prompt" for length in prompts)
                ms = triton.testing.do_bench(replay, warmup=20, rep=200, return_mode="median")
                results["steps"][name] = {
                    "graphs": type(graphs).__name__,
                    "ms": ms,
                    "kernels": kernel_table(replay, top=8),
                }
                print(f"{name:40} {type(graphs).__name__:14} {ms:7.3f} ms", flush=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
