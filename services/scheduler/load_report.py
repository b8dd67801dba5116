"""What an engine tells the frontends that route requests to it: its load and the keys of
the blocks its prefix cache holds (scheduler.proto's EngineLoad), sent on each WatchLoad
stream at once and then whenever it changes, at most once per interval. The keys go whole
in a stream's first report and as changes after (services/scheduler/cached_keys.py)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from pagedserve.v1 import scheduler_pb2

from services.scheduler.cached_keys import KeyCursor
from services.scheduler.scheduler import Scheduler

# current(cursor) -> (report, cursor after it): the report of a stream that has seen the
# cached keys up to `cursor` (None: nothing yet).
CurrentLoad = Callable[[KeyCursor | None], tuple[scheduler_pb2.EngineLoad, KeyCursor | None]]


def engine_load(
    scheduler: Scheduler | None, serving: bool, seen: KeyCursor | None = None
) -> tuple[scheduler_pb2.EngineLoad, KeyCursor | None]:
    """The load report of `scheduler` (None: an engine still waiting for its workers) for a
    stream that has seen the cached keys up to `seen`, and the cursor after the report."""
    if scheduler is None:
        return scheduler_pb2.EngineLoad(serving=False), None
    stats = scheduler.stats()
    block_manager = scheduler.block_manager
    report = scheduler_pb2.EngineLoad(
        serving=serving,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_total_blocks=stats.num_total_blocks,
        num_free_blocks=stats.num_free_blocks,
        block_size=block_manager.block_size,
    )
    keys = block_manager.cached_keys
    changes = None if seen is None else keys.changes_since(seen)
    if changes is None:
        whole, cursor = keys.snapshot()
        report.cached_block_keys.extend(whole)
        return report, cursor
    added, removed, cursor = changes
    report.cached_keys_changed = True
    report.cached_block_keys.extend(added)
    report.removed_block_keys.extend(removed)
    return report, cursor


# The report's fields other than the keys.
LoadOnly = tuple[bool, int, int, int, int, int]


def _load_only(report: scheduler_pb2.EngineLoad) -> LoadOnly:
    return (
        report.serving,
        report.num_running,
        report.num_waiting,
        report.num_total_blocks,
        report.num_free_blocks,
        report.block_size,
    )


async def load_reports(
    current: CurrentLoad, interval_s: float, stopped: asyncio.Event
) -> AsyncIterator[scheduler_pb2.EngineLoad]:
    """`current(None)` at once, then each interval when the load or the cached keys changed;
    once `stopped` is set, a last report (which says serving false) and the end."""
    last: LoadOnly | None = None
    seen: KeyCursor | None = None
    while True:
        report, cursor = current(seen)
        unchanged = (
            report.cached_keys_changed
            and not report.cached_block_keys
            and not report.removed_block_keys
            and _load_only(report) == last
        )
        if not unchanged:
            last, seen = _load_only(report), cursor
            yield report
        if stopped.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), interval_s)
