"""benchmarks/step_timeline.py's result gaps: runs split at pauses, gaps counted once per
sequence of the later step, the long ones traced to steps with prompt tokens, and how long
results took after the device."""

import pytest

from benchmarks.step_timeline import result_gaps, split_runs


def _step(finished: float, num_seqs: int, kind: str = "decode", ready_after_s: float = 0.0) -> dict:
    device = [finished - ready_after_s - 0.001, finished - ready_after_s]
    return {"finished": finished, "num_seqs": num_seqs, "kind": kind, "device": device}


def test_a_pause_of_a_second_starts_a_new_run() -> None:
    steps = [_step(t, 1) for t in (0.0, 0.002, 0.004, 5.0, 5.002)]
    assert [len(run) for run in split_runs(list(reversed(steps)))] == [3, 2]


def test_gaps_count_once_per_sequence_that_waited_them() -> None:
    # 98 gaps of 2 ms for 10 sequences each, then one of 10 ms ended by a mixed step of
    # 10 sequences and one of 5 ms for a single sequence.
    times = [0.002 * i for i in range(99)]
    steps = [_step(t, 10) for t in times]
    steps.append(_step(times[-1] + 0.010, 10, kind="mixed"))
    steps.append(_step(times[-1] + 0.015, 1))
    gaps = result_gaps(steps)
    assert gaps["gaps"] == 98 * 10 + 10 + 1
    assert gaps["p50_ms"] == pytest.approx(2.0)
    # The 1% tail (10 of 991 sequence gaps) reaches into the mixed step's 10 ms.
    assert gaps["p99_ms"] == pytest.approx(10.0)
    assert gaps["over_twice_median"] == pytest.approx(11 / 991)
    assert gaps["over_twice_median_with_prompts"] == pytest.approx(10 / 11)
    assert gaps["ready_after_device_p50_ms"] == gaps["ready_after_device_p99_ms"] == 0.0


def test_results_ready_after_the_device_in_percentiles_over_steps() -> None:
    # 98 steps ready 0.5 ms after the device, two 3 ms after; one without device work.
    steps = [_step(0.002 * i, 4, ready_after_s=0.0005) for i in range(98)]
    steps += [_step(0.2, 4, ready_after_s=0.003), _step(0.202, 4, ready_after_s=0.003)]
    steps.append({"finished": 0.204, "num_seqs": 0, "kind": None, "device": None})
    gaps = result_gaps(steps)
    assert gaps["ready_after_device_p50_ms"] == pytest.approx(0.5)
    assert gaps["ready_after_device_p99_ms"] == pytest.approx(3.0)


def test_no_gaps_in_a_single_step() -> None:
    assert result_gaps([_step(0.0, 4)]) == {"gaps": 0}
