"""Timing work on a device from the host, and giving its memory back between runs."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def synchronize(device: str) -> None:
    """Waits for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def release_memory(device: str) -> None:
    """Collects what a finished run dropped and hands the device's cached blocks back, so
    that the next run starts from the same free memory."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


@dataclass
class Stopwatch:
    start: float
    seconds: float = 0.0


@contextmanager
def timed(device: str) -> Iterator[Stopwatch]:
    """Times the block's work, the device synchronized on both sides so that work launched
    inside counts inside; `seconds` is set when the block ends."""
    synchronize(device)
    watch = Stopwatch(time.perf_counter())
    yield watch
    synchronize(device)
    watch.seconds = time.perf_counter() - watch.start
