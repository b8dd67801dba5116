"""A per-step record of where a worker's time goes, for finding what a run waits on.

With `pagedserve worker --step-timeline FILE` the worker appends one JSON line per step:
its size, when the host launched it, when the device computed it and when its result was
ready, all in seconds of the host's monotonic clock (time.perf_counter, which on Linux is
CLOCK_MONOTONIC: shared by every process of the machine, so a benchmark can cut a run's
window out of a worker's file). The gap between one step's device end and the next one's
device start is time the device waited for the host, the scheduler or the network.

    {"step": 7, "kind": "decode", "num_seqs": 256, "num_tokens": 256,
     "launch": [t0, t1], "device": [d0, d1], "finished": t2}

A step without device work (only finished sequences, say) has "kind" and "device" null.
Nothing here waits on the device: device times arrive once the worker's DeviceTimer has
resolved the step's events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO


class StepTimeline:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", buffering=1)
        # Steps launched whose line is not written yet, by step id.
        self._open: dict[int, dict] = {}

    def launched(
        self, step_id: int, kind: str | None, num_seqs: int, num_tokens: int, start_s: float, end_s: float
    ) -> None:
        record = {
            "step": step_id,
            "kind": kind,
            "num_seqs": num_seqs,
            "num_tokens": num_tokens,
            "launch": [start_s, end_s],
        }
        if kind is None:
            record["device"] = None
        self._open[step_id] = record

    def computed(self, step_id: int, kind: str, start_s: float, end_s: float) -> None:
        """The DeviceTimer's callback (gpu_worker/device_time.py)."""
        record = self._open.get(step_id)
        if record is not None:
            record["device"] = [start_s, end_s]
            self._write_if_complete(record)

    def finished(self, step_id: int, at_s: float) -> None:
        record = self._open.get(step_id)
        if record is not None:
            record["finished"] = at_s
            self._write_if_complete(record)

    def _write_if_complete(self, record: dict) -> None:
        # A step of partial prefill chunks samples nothing, so its result can be ready
        # before its device events resolve: the line waits for both.
        if "device" in record and "finished" in record:
            del self._open[record["step"]]
            self._file.write(json.dumps(record) + "\n")
