"""What watches the runner's steps, behind the hooks the runner calls as a step goes.

The device timer (gpu_worker/device_time.py) counts each step's device time by kind of
step; StepTelemetry exports its totals to Prometheus and the benchmarks read them. The
step timeline (gpu_worker/step_timeline.py), when one is written, records each step's
launch, device time and result. The runner calls, in order: on_device_start once a step's
inputs are built, on_launch once its work is queued, on_device_done once the device is done
with it and on_result once its result is ready. Steps are launched and finished in order,
on one thread.

The step's span and the step metrics are not among them: they cover a step from its
arrival until its result has left the worker, which only the step stream sees
(gpu_worker/servicer.py wraps them around each step).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pagedserve.v1 import worker_pb2

from gpu_worker.device_time import DECODE, PREFILL, DeviceTimer
from gpu_worker.input_batch import StepInputs
from gpu_worker.step_timeline import StepTimeline


class StepObserver:
    def __init__(self, device: torch.device, timeline_path: Path | None = None) -> None:
        self.timeline = StepTimeline(timeline_path) if timeline_path else None
        self.device_timer = DeviceTimer(device, self.timeline.computed if self.timeline else None)
        # The device timer's start of the step being launched.
        self._device_started: torch.cuda.Event | float = 0.0

    def on_device_start(self) -> None:
        """Before a step's device work is queued, after its inputs are built: a device
        that waits for the inputs is idle, not busy."""
        self._device_started = self.device_timer.start()

    def on_launch(
        self, step: worker_pb2.StepRequest, start_ns: int, inputs: StepInputs | None
    ) -> torch.cuda.Event | None:
        """Once the step's work is queued (inputs None: it has no device work). On CUDA
        returns the event that completes with the step's work."""
        timeline = self.timeline
        if inputs is None:
            if timeline is not None:
                timeline.launched(step.step_id, None, 0, 0, start_ns / 1e9, time.perf_counter())
            return None
        kind = DECODE if inputs.metadata.max_query_len == 1 else PREFILL
        if timeline is not None:
            # Before the timer's stop, which on CPU reports the step's device time at once.
            timeline.launched(
                step.step_id,
                kind,
                len(step.scheduled),
                inputs.input_ids.shape[0],
                start_ns / 1e9,
                time.perf_counter(),
            )
        return self.device_timer.stop(self._device_started, kind, step.step_id)

    def on_device_done(self) -> None:
        """Once the device is done with a step: counts the device time of every step
        whose work has completed, without waiting for any."""
        self.device_timer.resolve()

    def on_result(self, step_id: int, ready_at_s: float) -> None:
        """Once a step's result is ready (since ready_at_s, a time.perf_counter())."""
        if self.timeline is not None:
            self.timeline.finished(step_id, ready_at_s)
