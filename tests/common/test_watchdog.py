"""The watchdog on a service's event loop (services/common/watchdog.py): a loop blocked by
a call that never yields gets its stack logged, then the process's end; a loop that keeps
turning never does."""

import asyncio
import logging
import threading
import time

import pytest

from services.common.watchdog import LoopWatchdog


def _blocking_call(seconds: float) -> None:
    time.sleep(seconds)


def test_a_stalled_loop_is_logged_with_its_stack_then_ended(caplog: pytest.LogCaptureFixture) -> None:
    ended = threading.Event()

    async def main() -> None:
        watchdog = LoopWatchdog(0.8, on_timeout=ended.set)
        watchdog.start()
        await asyncio.sleep(0.3)
        _blocking_call(1.5)
        watchdog.stop()
        assert watchdog.num_stalls == 1

    with caplog.at_level(logging.ERROR, logger="services.common.watchdog"):
        asyncio.run(main())
    assert ended.is_set()
    stalled = [record.getMessage() for record in caplog.records if "stalled" in record.getMessage()]
    assert "_blocking_call" in stalled[0], "the log shows where the loop is stuck"


def test_a_loop_that_keeps_turning_is_left_alone() -> None:
    ended = threading.Event()

    async def main() -> None:
        watchdog = LoopWatchdog(0.5, on_timeout=ended.set)
        watchdog.start()
        for _ in range(15):
            await asyncio.sleep(0.1)
        watchdog.stop()
        assert watchdog.num_stalls == 0

    asyncio.run(main())
    assert not ended.is_set()


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="watchdog timeout"):
        LoopWatchdog(0)
