"""Scheduler benchmark on the CPU with the embedded model, in one process (scheduler and
model runner driven by a plain loop):

1. A shared-prefix workload with prefix caching on and off: one request warms the cache,
   then the others arrive together. Prompt tokens actually computed, and time to first
   token of the later requests.
2. KV utilization under load: live tokens over allocated KV slots (used blocks times block
   size), averaged over the steps of a run whose pool is kept full by a queue of requests.

    python -m benchmarks.scheduler_cpu [--json scheduler_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from pagedserve.v1 import common_pb2

from gpu_worker.config import WorkerConfig
from gpu_worker.model_runner import ModelRunner
from services.common.embedded_model import materialize_default_model
from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler


@dataclass
class PrefixRun:
    prefix_caching: bool
    requests: int
    prompt_tokens: int
    prompt_tokens_computed: int
    cached_tokens_reported: int
    mean_ttft_s: float
    p50_ttft_s: float
    seconds: float


@dataclass
class UtilizationRun:
    requests: int
    steps: int
    mean_utilization: float
    min_utilization_while_full: float
    seconds: float


def _greedy(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _scheduler(runner: ModelRunner, config: SchedulerConfig) -> Scheduler:
    info = runner.info()
    return Scheduler(
        config, info.num_kv_blocks, info.block_size, info.model.max_model_len, list(info.model.eos_token_ids)
    )


def _step(scheduler: Scheduler, runner: ModelRunner) -> tuple[list, int]:
    """One step; its outputs and the prompt tokens it computed."""
    step = scheduler.schedule()
    assert step is not None
    prompt_tokens = sum(
        max(
            0,
            min(item.sequence.num_prompt_tokens, item.sequence.num_computed_tokens + item.num_new_tokens)
            - item.sequence.num_computed_tokens,
        )
        for item in step.scheduled
    )
    return scheduler.update_from_output(step, runner.execute_step(step.to_proto())), prompt_tokens


def shared_prefix_run(
    runner: ModelRunner, caching: bool, num_requests: int, prefix_len: int, suffix_len: int, max_tokens: int
) -> PrefixRun:
    rng = random.Random(0)
    prefix = [rng.randint(100, 10_000) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randint(100, 10_000) for _ in range(suffix_len)] for _ in range(num_requests)]
    scheduler = _scheduler(runner, SchedulerConfig(enable_prefix_caching=caching))
    start = time.perf_counter()
    computed, cached, first_token_at, submitted_at = 0, 0, {}, {}

    def run_until_idle() -> None:
        nonlocal computed, cached
        while scheduler.has_unfinished_requests():
            outputs, prompt_tokens = _step(scheduler, runner)
            computed += prompt_tokens
            now = time.perf_counter()
            for output in outputs:
                first_token_at.setdefault(output.request_id, now)
                if output.finished:
                    cached += output.num_cached_tokens

    scheduler.add_request("r0", prompts[0], _greedy(max_tokens))
    submitted_at["r0"] = time.perf_counter()
    run_until_idle()
    for index, prompt in enumerate(prompts[1:], start=1):
        scheduler.add_request(f"r{index}", prompt, _greedy(max_tokens))
        submitted_at[f"r{index}"] = time.perf_counter()
    run_until_idle()
    ttfts = [first_token_at[f"r{i}"] - submitted_at[f"r{i}"] for i in range(1, num_requests)]
    return PrefixRun(
        caching,
        num_requests,
        sum(map(len, prompts)),
        computed,
        cached,
        statistics.mean(ttfts),
        statistics.median(ttfts),
        time.perf_counter() - start,
    )


def utilization_run(runner: ModelRunner, num_requests: int, num_blocks: int) -> UtilizationRun:
    rng = random.Random(1)
    scheduler = _scheduler(runner, SchedulerConfig(num_kv_blocks=num_blocks, enable_prefix_caching=False))
    for index in range(num_requests):
        prompt = [rng.randint(100, 10_000) for _ in range(rng.randint(100, 400))]
        scheduler.add_request(f"r{index}", prompt, _greedy(rng.randint(16, 64)))
    manager = scheduler.block_manager
    start, samples, full_samples = time.perf_counter(), [], []
    while scheduler.has_unfinished_requests():
        _step(scheduler, runner)
        used_slots = (manager.num_total_blocks - manager.num_free_blocks) * manager.block_size
        if used_slots:
            live = sum(s.num_computed_tokens for s in scheduler.running)
            samples.append(live / used_slots)
            # While requests still queue, the pool is as full as the scheduler can keep it.
            if scheduler.waiting:
                full_samples.append(live / used_slots)
    return UtilizationRun(
        num_requests,
        len(samples),
        statistics.mean(samples),
        min(full_samples) if full_samples else float("nan"),
        time.perf_counter() - start,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=480, help="shared prompt tokens (30 blocks)")
    parser.add_argument("--suffix-len", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--load-requests", type=int, default=24)
    parser.add_argument("--load-blocks", type=int, default=64, help="KV pool of the utilization run")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args()

    torch.manual_seed(0)
    runner = ModelRunner(
        WorkerConfig(model_path=materialize_default_model(), device="cpu", swap_space_bytes=0)
    )
    prefix_runs = [
        shared_prefix_run(runner, caching, args.requests, args.prefix_len, args.suffix_len, args.max_tokens)
        for caching in (False, True)
    ]
    utilization = utilization_run(runner, args.load_requests, args.load_blocks)

    print(
        "| prefix caching | prompt tokens | computed | cached (reported) | mean TTFT s | p50 TTFT s | run s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in prefix_runs:
        print(
            f"| {'on' if run.prefix_caching else 'off'} | {run.prompt_tokens} | {run.prompt_tokens_computed} | "
            f"{run.cached_tokens_reported} | {run.mean_ttft_s:.3f} | {run.p50_ttft_s:.3f} | {run.seconds:.1f} |"
        )
    print(
        f"\nKV utilization under load ({utilization.requests} requests, {args.load_blocks} blocks, "
        f"{utilization.steps} steps): mean {utilization.mean_utilization:.1%}, "
        f"lowest while requests queued {utilization.min_utilization_while_full:.1%}"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "prefix": [asdict(r) for r in prefix_runs],
                    "utilization": asdict(utilization),
                    "args": vars(args),
                },
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
