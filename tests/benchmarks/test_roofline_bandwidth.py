"""Which bandwidth the throughput benchmark's roofline is taken at: the one given, the
H200's measured one on an H200 (the targets are set against it), and this device's own,
measured, on any other GPU."""

from __future__ import annotations

import pytest

from benchmarks.throughput import H200_COPY_BANDWIDTH, roofline_bandwidth


def _never_measured() -> float:
    raise AssertionError("measured where it should not be")


def test_a_given_bandwidth_is_kept() -> None:
    assert roofline_bandwidth(3.0e12, "NVIDIA H100 80GB HBM3", _never_measured) == 3.0e12


@pytest.mark.parametrize("label", ["NVIDIA H200", "CPU (x86_64)"])
def test_an_h200_and_the_cpu_take_the_h200s_measured_bandwidth(label: str) -> None:
    assert roofline_bandwidth(None, label, _never_measured) == H200_COPY_BANDWIDTH


def test_another_gpu_is_measured() -> None:
    assert roofline_bandwidth(None, "NVIDIA H100 80GB HBM3", lambda: 2.9e12) == 2.9e12
