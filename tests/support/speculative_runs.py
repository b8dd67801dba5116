"""Drives a real scheduler and a real model runner in this process (as the offline API
does), for comparing runs with and without speculative decoding token for token."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedserve.v1 import common_pb2

from services.common.speculative import SpeculativeConfig
from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler
from services.scheduler.server import build_scheduler


@dataclass
class Run:
    # Per request, per completion index, the tokens it generated.
    tokens: list[dict[int, list[int]]]
    scheduler: Scheduler
    num_cached_tokens: list[int] = field(default_factory=list)
    # Per step: (proposed, accepted) summed over the step's speculating sequences.
    speculation: list[tuple[int, int]] = field(default_factory=list)


def make_runner(model_dir: Path, speculative: SpeculativeConfig, **worker: Any) -> Any:
    from gpu_worker.config import WorkerConfig
    from gpu_worker.model_runner import ModelRunner

    return ModelRunner(
        WorkerConfig(model_path=model_dir, device="cpu", speculative=speculative, max_model_len=512, **worker)
    )


def generate(
    runner: Any,
    prompts: list[list[int]],
    samplings: list[common_pb2.SamplingParams],
    config: SchedulerConfig,
) -> Run:
    """Every prompt to completion under `config`; the runner is reset afterwards."""
    scheduler = build_scheduler(config, runner.info())
    for index, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        scheduler.add_request(str(index), prompt, sampling)
    run = Run([{} for _ in prompts], scheduler, [0] * len(prompts))
    in_flight: deque[Any] = deque()
    while scheduler.has_unfinished_requests() or in_flight:
        while len(in_flight) < scheduler.max_steps_in_flight and (step := scheduler.schedule()) is not None:
            in_flight.append((step, runner.launch_step(step.to_proto())))
        assert in_flight, "unfinished requests but nothing to schedule"
        step, launched = in_flight.popleft()
        result = runner.finish_step(launched)
        if result.speculation:
            run.speculation.append(
                (
                    sum(o.num_proposed for o in result.speculation),
                    sum(o.num_accepted for o in result.speculation),
                )
            )
        for output in scheduler.update_from_output(step, result):
            request = int(output.request_id)
            run.tokens[request].setdefault(output.index, []).extend(output.new_token_ids)
            run.num_cached_tokens[request] = output.num_cached_tokens
    runner.reset()
    return run
