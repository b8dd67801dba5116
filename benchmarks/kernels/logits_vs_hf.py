"""pagedserve's forward against HF transformers' on the same random weights, in bf16 on GPU.

    python -m benchmarks.kernels.logits_vs_hf --json logits_vs_hf.json

For a few random prompts, every position's logits from one pagedserve prefill (Triton /
varlen kernels) and from HF's own Qwen3 (sdpa): relative error, and how often the argmax
agrees; where it does not, the top-2 margin in HF's logits shows whether it is a near-tie.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from benchmarks.arguments import benchmark_parser
from benchmarks.hf_runs import load_hf_model
from benchmarks.kernels.cuda_runner import build_cuda_runner
from benchmarks.workload import QWEN3_CONFIG, write_random_model
from gpu_worker.model.attention import AttentionMetadata, attention_context
from gpu_worker.model_runner import ModelRunner


@torch.inference_mode()
def pagedserve_logits(runner: ModelRunner, token_ids: torch.Tensor) -> torch.Tensor:
    num_tokens = token_ids.shape[0]
    block_size = runner.kv_cache.block_size
    blocks = torch.arange(-(-num_tokens // block_size), dtype=torch.int32, device="cuda")
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device="cuda"),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device="cuda"),
        block_tables=blocks[None, :],
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
    )
    with attention_context(metadata):
        hidden = runner.model(token_ids, torch.arange(num_tokens, device="cuda"))
    return runner.model.compute_logits(hidden).float()


def main() -> None:
    parser = benchmark_parser(__doc__, "logits_vs_hf.json")
    parser.add_argument("--model-config", type=Path, default=QWEN3_CONFIG)
    parser.add_argument("--prompt-lengths", default="17,300,1000")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_random_model(args.model_config, Path(scratch) / "model")
        runner = build_cuda_runner(model_dir, max_num_seqs=8, gpu_memory_utilization=0.3, enforce_eager=True)
        hf_model = load_hf_model(model_dir, "cuda", torch.bfloat16, "sdpa")
        generator = torch.Generator().manual_seed(1)
        for length in (int(n) for n in args.prompt_lengths.split(",")):
            token_ids = torch.randint(0, 10000, (length,), generator=generator).cuda()
            ours = pagedserve_logits(runner, token_ids)
            with torch.inference_mode():
                theirs = hf_model(token_ids[None]).logits[0].float()
            agree = ours.argmax(-1) == theirs.argmax(-1)
            top2 = theirs.topk(2, dim=-1).values
            margins = (top2[:, 0] - top2[:, 1])[~agree]
            rows.append(
                {
                    "prompt_length": length,
                    "relative_error": float((ours - theirs).norm() / theirs.norm()),
                    "argmax_agreement": float(agree.float().mean()),
                    "max_margin_where_disagree": float(margins.max()) if margins.numel() else None,
                    "median_top2_margin": float((top2[:, 0] - top2[:, 1]).median()),
                }
            )
            print(rows[-1])
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
