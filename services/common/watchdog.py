"""A watchdog on a service's own event loop. Every call, health check and step of a
service runs on its loop, so a loop that stops turning (a blocking call, a deadlock, a
runaway computation) stops the whole service while its process looks alive. The loop
stamps a heartbeat; a thread of its own checks it. Stalled for half the timeout: the
loop's stack goes to the log. Stalled for the whole timeout: the process exits, so that
its supervisor (`pagedserve serve`, Kubernetes) starts it again and its peers recover as
from a crash. Health checks time out meanwhile, which probes already read as failure:
the loop that would answer them is the one that is stuck."""

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)

# The exit status of a process the watchdog ended.
WATCHDOG_EXIT_CODE = 70


def _hard_exit() -> None:
    logging.shutdown()
    os._exit(WATCHDOG_EXIT_CODE)


class LoopWatchdog:
    def __init__(self, timeout_s: float, on_timeout: Callable[[], None] = _hard_exit) -> None:
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._interval_s = min(1.0, timeout_s / 8)
        self._last_tick = time.monotonic()
        self._loop_thread_id = threading.get_ident()
        self._stopped = threading.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        # Stalls seen so far (for tests and logs).
        self.num_stalls = 0

    def start(self) -> None:
        """Starts watching the running loop (call it from the loop's thread)."""
        self._loop_thread_id = threading.get_ident()
        self._last_tick = time.monotonic()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        threading.Thread(target=self._watch, name="loop-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()

    async def _beat(self) -> None:
        while True:
            self._last_tick = time.monotonic()
            await asyncio.sleep(self._interval_s)

    def _watch(self) -> None:
        warned = False
        while not self._stopped.wait(self._interval_s):
            stalled_s = time.monotonic() - self._last_tick
            if stalled_s < self.timeout_s / 2:
                warned = False
                continue
            if not warned:
                warned = True
                self.num_stalls += 1
                log.error(
                    "event loop stalled for %.1fs; at %.0fs the process exits. The loop is at:\n%s",
                    stalled_s,
                    self.timeout_s,
                    self._loop_stack(),
                )
            if stalled_s >= self.timeout_s:
                log.critical("event loop stalled for %.1fs: exiting so that the service restarts", stalled_s)
                self._on_timeout()
                return

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread_id)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)"
