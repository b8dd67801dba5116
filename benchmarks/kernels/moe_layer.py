"""Qwen3-30B-A3B's MoE block against a dense MLP with the same active parameters.

    python -m benchmarks.kernels.moe_layer --tokens 1,8,32,128,512,2048,8192 --json moe_layer.json

The target: an MoE layer within 1.5x of the time of a dense layer with the same active
parameters. On CUDA, with seeded random bf16 weights made on the device, at each token
count (random hidden states, seeded, so routing is roughly uniform over the experts):

- MoE: the block as the model runs it, model/moe.py's FusedMoE: router logits (hidden ->
  num_experts), route()'s top-k (renormalized per norm_topk_prob), and fused_moe_triton
  over the stacked experts w13 [E, 2I, H] and w2 [E, H, I] with the model's silu-and-mul.
- dense: model/decoder.py's GatedMLP of intermediate size k * I (k experts per token):
  gate_up [2kI, H], silu_and_mul, down [H, kI]; the FLOPs of the MoE's experts per token.

Both stop where the layer's next add + RMSNorm reads them. Each is captured in a CUDA
graph after a warm-up call and its replays timed with CUDA events (median); the L2 cache
is flushed before each replay, so weights come from memory as in the 48-layer model.

The dense layer reads its k * 3 * I * H weights whatever the batch; the MoE reads those of
every expert that some token picked: at 1 token as many bytes, from a few dozen tokens on
nearly all 128 experts. The table gives the experts hit and the TB/s at which the MoE
read their weights (the JSON also the bytes, and the copy bandwidth for reference).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.arguments import benchmark_parser
from benchmarks.kernels.decode_kernels import graph_ms
from benchmarks.kernels.decode_step import copy_bandwidth, kernel_table
from gpu_worker.kernels.moe import route
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.decoder import GatedMLP
from gpu_worker.model.loader import fill_dummy_weights
from gpu_worker.model.moe import FusedMoE

QWEN3_MOE_CONFIG = Path(__file__).parents[1] / "configs" / "qwen3-30b-a3b.json"
DEFAULT_TOKENS = "1,8,32,128,512,2048,8192"
TARGET_RATIO = 1.5
# Milliseconds of replays per measurement: tens of replays even at the largest counts.
REP_MS = 100


def load_moe_config(path: Path) -> ModelConfig:
    """The architecture as the worker parses it (model/config.py), so that the benchmark's
    shapes are the ones a checkpoint with this config.json would load into."""
    config = ModelConfig.from_dicts(json.loads(Path(path).read_text()))
    if not config.num_experts:
        raise SystemExit(f"{path}: model_type {config.model_type!r} has no routed experts")
    return config


def dense_equivalent(config: ModelConfig) -> ModelConfig:
    """The same model with a dense MLP as wide as the k experts a token runs through."""
    return dataclasses.replace(
        config,
        intermediate_size=config.num_experts_per_tok * config.moe_intermediate_size,
        moe_layers=(),
    )


@contextmanager
def made_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created with torch.empty on the default device and dtype (layers.py);
    making them in bf16 on the device directly skips an fp32 copy of 1.2 GB of experts."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_blocks(config: ModelConfig, device: str) -> tuple[FusedMoE, GatedMLP]:
    with made_on(device, torch.bfloat16):
        moe, dense = FusedMoE(config), GatedMLP(dense_equivalent(config))
    # Distinct seeds: the two must not share values that some cache could exploit.
    fill_dummy_weights(moe, seed=0)
    fill_dummy_weights(dense, seed=1)
    return moe.eval(), dense.eval()


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def expert_bytes(moe: FusedMoE) -> int:
    """One expert's gate, up and down weights."""
    experts = moe.experts
    return sum(w[0].numel() * w.element_size() for w in (experts.gate_up_proj, experts.down_proj))


def experts_hit(moe: FusedMoE, x: torch.Tensor) -> int:
    """How many distinct experts the batch routes to: the routing the graph replays, which
    depends only on the (fixed) inputs and weights."""
    _, ids = route(moe.gate(x), moe.top_k, moe.renormalize)
    return int(torch.unique(ids).numel())


def measure(moe: FusedMoE, dense: GatedMLP, x: torch.Tensor) -> dict:
    moe_ms = graph_ms(lambda: moe(x), rep_ms=REP_MS)
    dense_ms = graph_ms(lambda: dense(x), rep_ms=REP_MS)
    hit = experts_hit(moe, x)
    touched = hit * expert_bytes(moe)
    dense_bytes = weight_bytes(dense)
    return {
        "tokens": x.shape[0],
        "moe_ms": moe_ms,
        "dense_ms": dense_ms,
        "moe_over_dense": moe_ms / dense_ms,
        "within_target": moe_ms / dense_ms <= TARGET_RATIO,
        "experts_hit": hit,
        "expert_bytes": touched,
        "expert_bytes_over_dense_bytes": touched / dense_bytes,
        "expert_tb_per_s": touched / (moe_ms / 1e3) / 1e12,
        "dense_weight_bytes": dense_bytes,
        "dense_tb_per_s": dense_bytes / (dense_ms / 1e3) / 1e12,
    }


def print_table(results: dict) -> None:
    shape = results["shape"]
    print(
        f"\n{results['device']}, {results['model_config']}: MoE block (H {shape['hidden_size']}, "
        f"{shape['num_experts']} experts of I {shape['moe_intermediate_size']}, top "
        f"{shape['top_k']}) against a dense MLP of intermediate {shape['dense_intermediate_size']}; "
        f"copy bandwidth {results['copy_bandwidth'] / 1e12:.2f} TB/s\n"
    )
    print("| tokens | MoE ms | dense ms | MoE / dense | experts hit | expert TB/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results["rows"]:
        print(
            f"| {row['tokens']} | {row['moe_ms']:.4f} | {row['dense_ms']:.4f} | "
            f"{row['moe_over_dense']:.2f} | {row['experts_hit']} | {row['expert_tb_per_s']:.2f} |"
        )
    missed = [str(row["tokens"]) for row in results["rows"] if not row["within_target"]]
    verdict = f"missed at {', '.join(missed)} tokens" if missed else "met at every token count"
    print(f"\ntarget MoE / dense <= {TARGET_RATIO}: {verdict}")


def print_kernels(rows: list[dict], tokens: int) -> None:
    # Eager, not replayed: the calls per kernel are the graph's too, the times only roughly.
    print(f"\nMoE block at {tokens} tokens, its kernels by GPU time (eager):", file=sys.stderr)
    for row in rows:
        print(f"  {row['gpu_ms']:8.4f} ms {row['calls']:3d}x {row['kernel']}", file=sys.stderr)


def parse_tokens(text: str) -> list[int]:
    tokens = sorted({int(t) for t in text.split(",") if t.strip()})
    if not tokens or tokens[0] < 1:
        raise SystemExit(f"--tokens {text!r}: give positive token counts, comma-separated")
    return tokens


def main() -> None:
    parser = benchmark_parser(__doc__, "moe_layer.json")
    parser.add_argument("--model-config", type=Path, default=QWEN3_MOE_CONFIG)
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated token counts")
    parser.add_argument("--device", default="cuda", choices=["cuda"], help="CUDA graphs need a GPU")
    parser.add_argument(
        "--kernel-table",
        type=int,
        default=None,
        metavar="TOKENS",
        help="also list the MoE block's kernels (eager, profiled) at this token count",
    )
    args = parser.parse_args()
    tokens = parse_tokens(args.tokens)
    config = load_moe_config(args.model_config)
    if not torch.cuda.is_available():
        raise SystemExit("moe_layer replays CUDA graphs: it needs a CUDA device, and none is visible")

    moe, dense = build_blocks(config, args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)
    largest = max([*tokens, args.kernel_table or 0])
    # One draw sliced per count: every count's tokens are a prefix of the next one's.
    hidden = torch.randn(
        largest, config.hidden_size, dtype=torch.bfloat16, device=args.device, generator=generator
    )
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m benchmarks.kernels.moe_layer", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model_config": args.model_config.name,
        "shape": {
            "hidden_size": config.hidden_size,
            "num_experts": config.num_experts,
            "moe_intermediate_size": config.moe_intermediate_size,
            "top_k": config.num_experts_per_tok,
            "norm_topk_prob": config.norm_topk_prob,
            "dense_intermediate_size": dense_equivalent(config).intermediate_size,
            "expert_bytes_each": expert_bytes(moe),
        },
        "target_moe_over_dense": TARGET_RATIO,
        "copy_bandwidth": copy_bandwidth(),
        "rows": [],
    }
    with torch.inference_mode():
        for count in tokens:
            print(f"{count} tokens ...", file=sys.stderr, flush=True)
            results["rows"].append(measure(moe, dense, hidden[:count]))
        if args.kernel_table:
            x = hidden[: args.kernel_table]
            results["moe_kernels"] = kernel_table(lambda: moe(x), top=40)
            print_kernels(results["moe_kernels"], args.kernel_table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
