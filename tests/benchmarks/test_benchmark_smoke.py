"""The throughput benchmark end to end on CPU with the embedded model and a tiny workload:
every run reports sane numbers, and the gRPC stack generates exactly the in-process tokens,
with scheduling overlapped with the worker and without."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workload import nano_vllm_workload

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_SEQS, MIN_LEN, MAX_LEN = 2, 4, 8


def run_benchmark(module: str, *args: str, out: Path) -> tuple[dict, str]:
    """Runs `python -m benchmarks.MODULE ARGS --json OUT` from the repository root; its
    JSON results and its printed output."""
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args, "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(out.read_text()), completed.stdout


@pytest.mark.hf
@pytest.mark.e2e
def test_cpu_benchmark_runs_every_engine(embedded_model_dir: Path, tmp_path: Path) -> None:
    summary, printed = run_benchmark(
        "throughput",
        "--device",
        "cpu",
        "--model",
        str(embedded_model_dir),
        "--num-seqs",
        str(NUM_SEQS),
        "--min-len",
        str(MIN_LEN),
        "--max-len",
        str(MAX_LEN),
        "--grpc-clients",
        "1",
        "--hf-static-batch",
        "2",
        "--log-dir",
        str(tmp_path / "logs"),
        "--overlap",
        "both",
        "--swap-space",
        "0",
        "--step-timeline",
        str(tmp_path / "timelines"),
        out=tmp_path / "throughput.json",
    )

    expected_tokens = nano_vllm_workload(NUM_SEQS, MIN_LEN, MAX_LEN).num_output_tokens
    assert summary["workload"]["output_tokens"] == expected_tokens
    runs = summary["runs"]
    pagedserve_runs = [
        "pagedserve in-process",
        "pagedserve in-process, no overlap",
        "pagedserve gRPC (3 services)",
        "pagedserve gRPC (3 services), no overlap",
    ]
    assert set(runs) == {
        *pagedserve_runs,
        "HF generate_batch (paged|sdpa)",
        "HF generate (static batches of 2)",
    }, [run["note"] for run in runs.values()]
    for run in runs.values():
        assert run["seconds"] > 0 and run["tokens_per_second"] > 0, run
        assert run["num_seqs"] == NUM_SEQS, run
    for name in pagedserve_runs:
        # The worker's device time over the run (on CPU: its compute), which a run can
        # not take less time than.
        profile = runs[name]["profile"]
        assert profile["device_busy_prefill_s"] > 0 and profile["device_busy_decode_s"] > 0, (name, profile)
        assert profile["device_busy_s"] <= runs[name]["seconds"], (name, profile)
        # The worker's step timeline, cut to the run's window: the same device time, and
        # every step in one of the bands.
        timeline = runs[name]["step_timeline"]
        assert timeline["device_busy_s"] == pytest.approx(profile["device_busy_s"], rel=0.01), (
            name,
            timeline,
        )
        assert 0 <= timeline["device_idle_s"] <= runs[name]["seconds"] - timeline["device_busy_s"] + 0.01, (
            timeline
        )
        assert sum(band["steps"] for band in timeline["bands"].values()) == timeline["steps"], timeline
        assert {"prefill/mixed", "decode 1-15"} <= set(timeline["bands"]), timeline
    for name in (*pagedserve_runs, "HF generate (static batches of 2)"):
        # ignore_eos (min_new_tokens for HF generate): every sequence runs to its length.
        assert runs[name]["output_tokens"] == expected_tokens, runs[name]
    assert runs["pagedserve in-process"]["ratio_to_pagedserve"] == 1.0
    # Greedy in fp32: every pagedserve run generates exactly what the in-process engine does.
    for name in pagedserve_runs[1:]:
        match = runs[name]["greedy_prefix_match"]
        assert match["identical"] == match["sequences"] == NUM_SEQS, (name, match)
    assert "pagedserve in-process" in printed  # the table


def test_host_cost_benchmark_runs_the_whole_workload(tmp_path: Path) -> None:
    """benchmarks/host_cost.py (the engine's host work with the model stubbed) still
    drives every step of its workload: a step count that matches the workload's decode
    length, and a build time for every batch size it passed through."""
    summary, _ = run_benchmark("host_cost", "--num-seqs", "8", out=tmp_path / "host_cost.json")
    workload = nano_vllm_workload(8)
    # One prefill step at least, then one decode step per token of the longest output.
    assert max(workload.output_lengths) <= summary["steps"] <= max(workload.output_lengths) + 8
    assert all(ms > 0 for ms in summary["ms_per_step"].values()), summary
    assert {"1", "8"} <= set(summary["median_build_us_by_batch_up_to"]), summary


@pytest.mark.e2e
def test_service_overhead_benchmark_runs_both_engines(tmp_path: Path) -> None:
    """benchmarks/service_overhead.py (the services in front of a pretend device) drives
    the workload in-process and through the three services, and reads the pretend
    device's busy time back from the worker's metrics."""
    summary, _ = run_benchmark(
        "service_overhead", "--num-seqs", "4", "--clients", "1", out=tmp_path / "service_overhead.json"
    )
    runs = summary["runs"]
    expected_tokens = nano_vllm_workload(4).num_output_tokens
    assert set(runs) == {"pagedserve in-process", "pagedserve gRPC (3 services)"}, runs
    for name, run in runs.items():
        assert run["output_tokens"] == expected_tokens, (name, run)
        # Every decode step alone takes the pretend device 0.85 ms or more.
        assert 0.85e-3 * max(nano_vllm_workload(4).output_lengths) < run["device_busy_s"] <= run["seconds"], (
            name,
            run,
        )
    assert set(runs["pagedserve gRPC (3 services)"]["cpu_seconds"]) == {"worker", "scheduler", "tokenizer"}


def test_launch_profile_splits_each_launch_into_its_operations(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    """benchmarks/launch_profile.py profiles the launches of its window only, and what it
    lists under them adds up to no more than their time."""
    summary, _ = run_benchmark(
        "launch_profile",
        "--device",
        "cpu",
        "--num-seqs",
        "2",
        "--lengths",
        "4:8",
        "--windows",
        "12:15",
        out=tmp_path / "launch_profile.json",
    )
    (window,) = summary["windows"].values()
    assert window["steps"] == 3 and window["batch_sizes"][1] <= 2, window
    top = window["top_self_us_per_step"]
    assert "aten::mm" in top and "launch_step (Python)" in top, top
    assert sum(top.values()) <= window["launch_us_per_step"] * 1.001, window


def test_speculative_benchmark_compares_both_ways(tmp_path: Path) -> None:
    """benchmarks/speculative.py runs each workload with and without speculation, and
    greedy tokens agree."""
    summary, printed = run_benchmark(
        "speculative",
        *("--device", "cpu", "--batch-sizes", "1", "--max-tokens", "8"),
        *("--nano-batch", "2", "--nano-max-len", "8"),
        out=tmp_path / "speculative.json",
    )
    assert [(row["workload"], row["batch"]) for row in summary["rows"]] == [
        ("copy-heavy", 1),
        ("nano-vllm", 2),
    ]
    assert all(row["tokens_identical"] for row in summary["rows"])
    assert summary["rows"][0]["on"]["proposed"] > 0
    assert "speedup" in printed


@pytest.mark.e2e
def test_structured_output_benchmark_serves_its_own_stack(tmp_path: Path) -> None:
    """benchmarks/structured_output.py --serve starts the HTTP API itself and runs the
    same batch constrained and plain, each request as long in both runs."""
    summary, _ = run_benchmark(
        "structured_output",
        *("--serve", "--batch", "2", "--max-tokens", "4", "--prompt-len", "8"),
        out=tmp_path / "structured_output.json",
    )
    assert summary["output_tokens"] == 2 * 4, summary
    assert summary["constrained_tokens_per_s"] > 0 and summary["plain_tokens_per_s"] > 0, summary
