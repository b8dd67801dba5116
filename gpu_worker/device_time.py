"""How long the device spent on steps, by kind of step.

Wall time says little on a worker whose steps overlap: a step's wall time counts the wait
for the steps launched before it, and the host may fall behind without any step taking
longer. So on CUDA each step's forward and sampling are bracketed by two timing events in
stream order: the first runs when the device reaches the step (after the previous step's
work, or at once if the device was idle waiting for the host), the second when the step's
work is done. Their difference is the step's own device time (with any gaps while the
host launches its kernels, which only eager steps have); what the device did not spend on
steps, it spent idle. On CPU the work is synchronous and is timed on the host.

The totals are read by Prometheus (gpu_worker/step_telemetry.py) and the benchmarks;
resolving events costs one query per finished step, never a synchronization.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

# Step kinds: decode-only steps (one new token per sequence: the ones CUDA graphs replay),
# and steps with prompt tokens.
DECODE = "decode"
PREFILL = "prefill"

# on_step(step_id, kind, start_s, end_s): one step's device work, in seconds of the host's
# time.perf_counter clock.
StepCallback = Callable[[int, str, float, float], None]


class DeviceTimer:
    def __init__(self, device: torch.device, on_step: StepCallback | None = None) -> None:
        self._cuda = device.type == "cuda"
        # Seconds of device work of the steps resolved so far.
        self.seconds = {DECODE: 0.0, PREFILL: 0.0}
        # (step id, kind, start event, end event) of steps whose end may not have run yet,
        # oldest first.
        self._pending: deque[tuple[int, str, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._on_step = on_step
        self._reference: torch.cuda.Event | None = None
        self._reference_s = 0.0
        if on_step is not None and self._cuda:
            # Device times on the host's clock: events' offsets from one event whose host
            # time is known, taken once on an idle device.
            torch.cuda.synchronize(device)
            self._reference = torch.cuda.Event(enable_timing=True)
            self._reference.record()
            self._reference.synchronize()
            self._reference_s = time.perf_counter()

    def start(self) -> torch.cuda.Event | float:
        """Call before the step's forward is queued."""
        if not self._cuda:
            return time.perf_counter()
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        return started

    def stop(self, started: torch.cuda.Event | float, kind: str, step_id: int = 0) -> torch.cuda.Event | None:
        """Call after the step's last device work is queued; on CUDA returns the event that
        completes with it (a step's tokens are on the host once it has)."""
        if isinstance(started, float):  # on CPU
            ended_s = time.perf_counter()
            self.seconds[kind] += ended_s - started
            if self._on_step is not None:
                self._on_step(step_id, kind, started, ended_s)
            return None
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        self._pending.append((step_id, kind, started, ended))
        return ended

    def resolve(self) -> None:
        """Adds the steps whose work has completed to the totals. Steps complete in the
        order they were queued, so the first pending one not done ends the scan."""
        pending = self._pending
        while pending and pending[0][3].query():
            step_id, kind, started, ended = pending.popleft()
            self.seconds[kind] += started.elapsed_time(ended) / 1e3
            reference = self._reference
            if self._on_step is not None and reference is not None:
                self._on_step(
                    step_id,
                    kind,
                    self._reference_s + reference.elapsed_time(started) / 1e3,
                    self._reference_s + reference.elapsed_time(ended) / 1e3,
                )
