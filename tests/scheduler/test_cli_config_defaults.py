"""Each command line's defaults are its configuration classes' own: `pagedserve worker`,
`pagedserve scheduler` and the services `pagedserve serve` starts, given no options, run
with the dataclasses' field defaults."""

import argparse
from pathlib import Path

from gpu_worker.config import WorkerConfig
from services.cli import build_parser, scheduler_config, worker_config
from services.launcher import service_commands
from services.scheduler.config import SchedulerConfig

MODEL = Path("/models/m")


def _parse(command: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(command)


def test_worker_defaults_are_the_worker_configs() -> None:
    assert worker_config(_parse(["worker", "--model", str(MODEL)])) == WorkerConfig(model_path=MODEL)


def test_scheduler_defaults_are_the_scheduler_configs() -> None:
    assert scheduler_config(_parse(["scheduler", "--worker", "w:1"])) == SchedulerConfig()


def test_serve_defaults_reach_each_service_unchanged() -> None:
    commands = service_commands(
        _parse(["serve", "--model", str(MODEL)]), MODEL, {"worker": 1, "scheduler": 2}
    )
    worker, scheduler = commands["worker"], commands["scheduler"]
    assert worker_config(_parse(worker[worker.index("worker") :])) == WorkerConfig(model_path=MODEL)
    assert scheduler_config(_parse(scheduler[scheduler.index("scheduler") :])) == SchedulerConfig()


def test_zero_turns_off_the_prompt_token_cap() -> None:
    config = scheduler_config(
        _parse(["scheduler", "--worker", "w:1", "--max-prompt-tokens-with-decodes", "0"])
    )
    assert config.max_prompt_tokens_with_decodes is None
    assert SchedulerConfig().max_prompt_tokens_with_decodes is not None
