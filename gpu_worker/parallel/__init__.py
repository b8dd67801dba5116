"""Tensor and pipeline parallelism: one engine's ranks, their groups and collectives."""

from gpu_worker.parallel.config import ParallelConfig, check_model_fits, stage_layer_range
from gpu_worker.parallel.groups import (
    SINGLE_RANK,
    SINGLE_RANK_CONTEXT,
    ParallelContext,
    ParallelStartupError,
    RankGroup,
    close_parallel,
    init_parallel,
)

__all__ = [
    "SINGLE_RANK",
    "SINGLE_RANK_CONTEXT",
    "ParallelConfig",
    "ParallelContext",
    "ParallelStartupError",
    "RankGroup",
    "check_model_fits",
    "close_parallel",
    "init_parallel",
    "stage_layer_range",
]
