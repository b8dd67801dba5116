"""A scheduler's counters as the SchedulerStats message that GetStats returns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.v1 import scheduler_pb2

from services.scheduler.queues import num_requests

if TYPE_CHECKING:
    from services.scheduler.scheduler import Scheduler


def scheduler_stats(scheduler: Scheduler) -> scheduler_pb2.SchedulerStats:
    """What GetStats reports of a scheduler."""
    return scheduler_pb2.SchedulerStats(
        num_running=num_requests(scheduler.running),
        num_waiting=num_requests(scheduler.waiting),
        num_swapped=num_requests(scheduler.swapped),
        num_total_blocks=scheduler.block_manager.num_total_blocks,
        num_free_blocks=scheduler.block_manager.num_free_blocks,
        num_total_cpu_blocks=scheduler.cpu_pool.num_total_blocks,
        num_free_cpu_blocks=scheduler.cpu_pool.num_free_blocks,
        num_preemptions=scheduler.num_preemptions,
        num_preemptions_recompute=scheduler.preemption.num_recompute,
        num_preemptions_swap=scheduler.preemption.num_swap,
        prefix_cache_queries=scheduler.prefix_cache.num_queried_tokens,
        prefix_cache_hits=scheduler.prefix_cache.num_hit_tokens,
        num_prompt_tokens=scheduler.num_prompt_tokens,
        num_generation_tokens=scheduler.num_generation_tokens,
        num_steps=scheduler.num_steps,
    )
