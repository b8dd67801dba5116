"""What an engine tells the frontends that route requests to it: its load and the keys of
the blocks its prefix cache holds (scheduler.proto's EngineLoad), sent on each WatchLoad
stream at once and then whenever it changes, at most once per interval."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from pagedserve.v1 import scheduler_pb2

from services.common.block_hash import routing_key
from services.scheduler.scheduler import Scheduler


def engine_load(scheduler: Scheduler | None, serving: bool) -> scheduler_pb2.EngineLoad:
    """The load report of `scheduler`, or of an engine still waiting for its workers."""
    if scheduler is None:
        return scheduler_pb2.EngineLoad(serving=False)
    stats = scheduler.stats()
    block_manager = scheduler.block_manager
    keys = [routing_key(block_hash) for block_hash in block_manager.cached_hashes()]
    return scheduler_pb2.EngineLoad(
        serving=serving,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_total_blocks=stats.num_total_blocks,
        num_free_blocks=stats.num_free_blocks,
        block_size=block_manager.block_size,
        cached_block_keys=sorted(keys),
    )


async def load_reports(
    current: Callable[[], scheduler_pb2.EngineLoad], interval_s: float, stopped: asyncio.Event
) -> AsyncIterator[scheduler_pb2.EngineLoad]:
    """`current()` at once, then each interval when it differs from the last one sent;
    once `stopped` is set, a last report (which says serving false) and the end."""
    last: scheduler_pb2.EngineLoad | None = None
    while True:
        report = current()
        if report != last:
            last = report
            yield report
        if stopped.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), interval_s)
