"""The engine's loop in one process, for worker tests: the real scheduler driving a
ModelRunner (on CPU unless told otherwise), with steps overlapped as the services
overlap them."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedserve.v1 import common_pb2

from gpu_worker.config import WorkerConfig
from gpu_worker.model_runner import ModelRunner
from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler

# (request id, prompt token ids, sampling)
EngineRequest = tuple[str, list[int], common_pb2.SamplingParams]


@dataclass
class EngineRun:
    # Generated tokens by (request id, completion index).
    tokens: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    # Prompt logprobs by request id, for requests that asked.
    prompt_logprobs: dict[str, list[common_pb2.TokenLogprobs]] = field(default_factory=dict)
    # Finish reason by (request id, completion index), for completions that finished.
    finish_reasons: dict[tuple[str, int], int] = field(default_factory=dict)
    # Whether every KV block was back in the free pool once all requests finished.
    all_blocks_freed: bool = False


def run_engine(
    model_dir: Path,
    requests: list[EngineRequest],
    eos_token_id: int,
    steps_in_flight: int = 1,
    num_kv_blocks: int = 64,
    preemption_mode: str = "recompute",
    max_num_batched_tokens: int = 24,
    block_size: int = 4,
    prepare_runner: Callable[[ModelRunner], None] | None = None,
    **worker_options: Any,
) -> EngineRun:
    """prepare_runner: called with the runner before the first step. worker_options:
    WorkerConfig's other fields (device, dtype, enforce_eager, ...)."""
    runner = ModelRunner(
        WorkerConfig(
            model_path=model_dir,
            **{"device": "cpu", **worker_options},
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            swap_space_bytes=1 << 20,
        )
    )
    if prepare_runner is not None:
        prepare_runner(runner)
    info = runner.info()
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_steps_in_flight=steps_in_flight,
            preemption_mode=preemption_mode,
            seed=0,
        ),
        num_blocks=info.num_kv_blocks,
        block_size=block_size,
        max_model_len=info.model.max_model_len,
        eos_token_ids=[eos_token_id],
        num_cpu_blocks=info.num_cpu_blocks,
    )
    for request_id, prompt, sampling in requests:
        scheduler.add_request(request_id, prompt, sampling)
    run = EngineRun()
    in_flight: deque = deque()
    while scheduler.has_unfinished_requests() or in_flight:
        while len(in_flight) < scheduler.max_steps_in_flight:
            step = scheduler.schedule()
            if step is None:
                break
            in_flight.append((step, runner.launch_step(step.to_proto())))
        step, launched = in_flight.popleft()
        for output in scheduler.update_from_output(step, runner.finish_step(launched)):
            run.tokens.setdefault((output.request_id, output.index), []).extend(output.new_token_ids)
            if output.prompt_logprobs:
                assert output.request_id not in run.prompt_logprobs, "prompt logprobs sent twice"
                run.prompt_logprobs[output.request_id] = list(output.prompt_logprobs)
            if output.finished:
                run.finish_reasons[output.request_id, output.index] = output.finish_reason
    blocks = scheduler.block_manager
    run.all_blocks_freed = blocks.num_free_blocks == blocks.num_total_blocks
    return run
