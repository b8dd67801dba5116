"""The worker's device timer counts the time its steps computed and not the time the
device waited between them (gpu_worker/device_time.py). The CUDA case runs where a GPU
is; on CPU the timer times the synchronous work on the host."""

from __future__ import annotations

import json
import time

import pytest
import torch

from gpu_worker.device_time import DECODE, PREFILL, DeviceTimer
from gpu_worker.step_timeline import StepTimeline


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
    steps: list[tuple[int, str, float, float]] = []
    timer = DeviceTimer(device, lambda *step: steps.append(step))

    def spin_step(step_id: int, kind: str, milliseconds: float) -> torch.cuda.Event:
        started = timer.start()
        torch.cuda._sleep(int(milliseconds * 1e-3 * cycles_per_second))
        return timer.stop(started, kind, step_id)

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
    spin_step(1, PREFILL, 20)
    spin_step(2, DECODE, 10)
    torch.cuda.synchronize()
    time.sleep(0.05)
    last_launched = time.perf_counter()
    last = spin_step(3, DECODE, 10)
    timer.resolve()
    assert timer.seconds[DECODE] < 0.02  # the last step has not been resolved: still running
    last.synchronize()
    timer.resolve()
    assert timer.seconds[PREFILL] == pytest.approx(0.02, rel=0.1)
    assert timer.seconds[DECODE] == pytest.approx(0.02, rel=0.1)
    # Each step's device start and end on the host's clock: back to back, then after the
    # host's pause.
    assert [(step_id, kind) for step_id, kind, _, _ in steps] == [(1, PREFILL), (2, DECODE), (3, DECODE)]
    (_, _, start1, end1), (_, _, start2, end2), (_, _, start3, end3) = steps
    assert end1 - start1 == pytest.approx(0.02, rel=0.1) and end3 - start3 == pytest.approx(0.01, rel=0.1)
    assert 0 <= start2 - end1 < 0.002
    assert last_launched - 0.002 <= start3 and start3 - end2 >= 0.05


def test_step_timeline_writes_a_step_once_its_device_time_and_result_are_in(tmp_path) -> None:
    path = tmp_path / "timeline.jsonl"
    timeline = StepTimeline(path)
    timer = DeviceTimer(torch.device("cpu"), timeline.computed)
    launch_start = time.perf_counter()
    started = timer.start()
    time.sleep(0.01)
    timeline.launched(1, DECODE, 3, 3, launch_start, time.perf_counter())
    timer.stop(started, DECODE, 1)
    assert path.read_text() == ""  # the result is not ready yet
    timeline.launched(2, None, 0, 0, time.perf_counter(), time.perf_counter())  # no device work
    timeline.finished(2, time.perf_counter())
    timeline.finished(1, time.perf_counter())
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert (second["step"], second["kind"], second["num_seqs"], second["num_tokens"]) == (1, DECODE, 3, 3)
    assert second["launch"][0] <= second["device"][0] < second["device"][1] <= second["finished"]
    assert second["device"][1] - second["device"][0] >= 0.01
    assert first == {**first, "step": 2, "kind": None, "device": None}
