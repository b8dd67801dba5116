"""The worker's device timer counts the time its steps computed and not the time the
device waited between them (gpu_worker/device_time.py). The CUDA case runs where a GPU
is; on CPU the timer times the synchronous work on the host."""

from __future__ import annotations

import time

import pytest
import torch

from gpu_worker.device_time import DECODE, PREFILL, DeviceTimer


def test_cpu_steps_count_their_own_time_by_kind() -> None:
    timer = DeviceTimer(torch.device("cpu"))
    for kind, seconds in ((PREFILL, 0.03), (DECODE, 0.01), (DECODE, 0.01)):
        started = timer.start()
        time.sleep(seconds)
        assert timer.stop(started, kind) is None
        time.sleep(0.02)  # between steps: not counted
    timer.resolve()
    assert 0.03 <= timer.seconds[PREFILL] < 0.045, timer.seconds
    assert 0.02 <= timer.seconds[DECODE] < 0.035, timer.seconds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_count_device_time_not_host_gaps() -> None:
    device = torch.device("cuda")
    timer = DeviceTimer(device)

    def spin_step(kind: str, milliseconds: float) -> torch.cuda.Event:
        started = timer.start()
        torch.cuda._sleep(int(milliseconds * 1e-3 * cycles_per_second))
        return timer.stop(started, kind)

    # Cycles per second of torch.cuda._sleep, measured once its first launch (which loads
    # the kernel, and would count in the measurement) is out of the way.
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    cycles_per_second = 50_000_000 / (begin.elapsed_time(end) / 1e3)

    # Two steps queued back to back (the second waits for the first on the device: its
    # wait must not count), then one after the host left the device idle.
    spin_step(PREFILL, 20)
    spin_step(DECODE, 10)
    torch.cuda.synchronize()
    time.sleep(0.05)
    last = spin_step(DECODE, 10)
    timer.resolve()
    assert timer.seconds[DECODE] < 0.02  # the last step has not been resolved: still running
    last.synchronize()
    timer.resolve()
    assert timer.seconds[PREFILL] == pytest.approx(0.02, rel=0.1)
    assert timer.seconds[DECODE] == pytest.approx(0.02, rel=0.1)
