"""Prefix-aware routing against round robin over several engines: many users sharing a
few long system prompts, each user with a question of its own, sent concurrently to
`pagedserve serve --engines N` with the embedded model.

    python -m benchmarks.prefix_routing                          # CPU, 2 engines
    python -m benchmarks.prefix_routing --system-prompts 12 --num-kv-blocks 128   # pools too small for all
    python -m benchmarks.prefix_routing --device cuda --users 512 --concurrency 64

For each policy it prints the prefix-cache hit rate over all engines (prompt tokens
found cached / prompt tokens looked up, from each engine's GetStats), the share of
requests each engine served, and output tokens per second; writes them to --json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from services.common.embedded_model import materialize_default_model
from services.launcher import free_port, loopback_service_commands, running_services

WORDS = [
    "paged",
    "attention",
    "block",
    "cache",
    "engine",
    "token",
    "prompt",
    "sequence",
    "scheduler",
    "worker",
    "model",
]


def system_prompts(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"System prompt {i}. " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(count)]


def workload(args: argparse.Namespace) -> list[generation_pb2.GenerateRequest]:
    systems = system_prompts(args.system_prompts, args.system_prompt_words)
    rng = random.Random(1)
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    return [
        generation_pb2.GenerateRequest(
            prompt=f"{rng.choice(systems)}\nUser {user}: what about {rng.choice(WORDS)} {user}?",
            sampling=sampling,
        )
        for user in range(args.users)
    ]


def _stats(address: str) -> scheduler_pb2.SchedulerStats:
    with grpc.insecure_channel(address) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest(), timeout=30)


def run_policy(args: argparse.Namespace, policy: str, log_dir: Path) -> dict:
    ports = {name: free_port() for name in ("worker", "scheduler", "tokenizer")}
    flags = ["--engines", str(args.engines), "--device", args.device]
    flags += [] if args.num_kv_blocks is None else ["--num-kv-blocks", str(args.num_kv_blocks)]
    commands = loopback_service_commands(materialize_default_model(), ports, flags)
    commands["tokenizer"] += ["--routing-policy", policy]
    addresses = {name: f"127.0.0.1:{ports[name]}" for name in commands}
    requests = workload(args)
    with (
        running_services(commands, addresses, log_dir),
        grpc.insecure_channel(addresses["tokenizer"]) as channel,
    ):
        generation = generation_pb2_grpc.GenerationStub(channel)

        def send(request: generation_pb2.GenerateRequest) -> int:
            return sum(len(m.token_ids) for m in generation.Generate(request, timeout=1800))

        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            num_tokens = sum(pool.map(send, requests))
        elapsed = time.monotonic() - started
        stats = [_stats(addresses[name]) for name in commands if name.endswith("scheduler")]
    queried = sum(s.prefix_cache_queries for s in stats)
    return {
        "policy": policy,
        "prefix_cache_hit_rate": sum(s.prefix_cache_hits for s in stats) / max(queried, 1),
        "prompt_tokens_per_engine": [s.num_prompt_tokens for s in stats],
        "output_tokens_per_s": num_tokens / elapsed,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--system-prompt-words", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="each engine's KV pool, to make the prompts outgrow one",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as logs:
        for policy in ("round_robin", "prefix"):
            result = run_policy(args, policy, Path(logs) / policy)
            print(
                f"{policy:12s} hit rate {result['prefix_cache_hit_rate']:.1%}  "
                f"{result['output_tokens_per_s']:.1f} output tok/s  "
                f"prompt tokens per engine {result['prompt_tokens_per_engine']}",
                flush=True,
            )
            results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
