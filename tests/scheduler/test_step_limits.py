"""The size of a step, which the scheduler adopts from its worker: what the worker reports,
what the scheduler keeps of it, and what it refuses."""

import pytest
from pagedserve.v1 import worker_pb2

from services.common.step_limits import StepLimits, StepLimitsError
from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler

WORKER = StepLimits(max_num_seqs=4, max_num_batched_tokens=64, max_steps_in_flight=2)


def test_unset_limits_are_the_workers() -> None:
    assert SchedulerConfig().step_limits(WORKER) == WORKER


def test_smaller_limits_stand_and_more_steps_in_flight_may_wait_at_the_worker() -> None:
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_steps_in_flight=3)
    assert config.step_limits(WORKER) == StepLimits(2, 16, 3)


@pytest.mark.parametrize(
    ("setting", "asked", "flag"),
    [("max_num_seqs", 8, "--max-num-seqs"), ("max_num_batched_tokens", 128, "--max-num-batched-tokens")],
)
def test_more_than_the_worker_is_built_for_is_refused(setting: str, asked: int, flag: str) -> None:
    with pytest.raises(StepLimitsError) as refused:
        SchedulerConfig(**{setting: asked}).step_limits(WORKER)
    message = str(refused.value)
    assert f"{setting} {asked}" in message and str(getattr(WORKER, setting)) in message
    assert flag in message


def test_without_a_worker_unset_limits_are_the_standard_ones_and_set_ones_stand() -> None:
    assert SchedulerConfig().step_limits() == StepLimits()
    assert SchedulerConfig(max_num_seqs=1024).step_limits().max_num_seqs == 1024


def test_the_scheduler_reads_back_what_a_worker_reports() -> None:
    info = worker_pb2.WorkerInfo(**WORKER.worker_info_fields())
    assert StepLimits.from_worker_info(info) == WORKER


def test_a_worker_that_reports_no_limits_is_refused() -> None:
    with pytest.raises(StepLimitsError, match="max_num_seqs"):
        StepLimits.from_worker_info(worker_pb2.WorkerInfo(num_kv_blocks=8, block_size=4))


def test_the_scheduler_schedules_within_the_adopted_limits() -> None:
    scheduler = Scheduler(SchedulerConfig(), 64, 4, 256, [0], worker_limits=WORKER)
    assert scheduler.limits == WORKER and scheduler.max_steps_in_flight == 2
    assert scheduler.admission.max_num_seqs == 4
