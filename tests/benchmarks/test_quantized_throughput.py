"""The quantization modes side by side through gRPC (benchmarks/quantized_throughput.py):
the order the modes run in, the settings each mode runs with, and one run end to end on
CPU with the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.arguments import benchmark_parser
from benchmarks.quantized_throughput import mode_settings, run_order
from benchmarks.throughput import add_workload_args
from benchmarks.workload import nano_vllm_workload
from gpu_worker.config import WorkerConfig
from tests.benchmarks.test_benchmark_smoke import run_benchmark


def test_modes_run_in_order_then_in_reverse() -> None:
    assert run_order(["a", "b", "c"], 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert run_order(["a", "b"], 1) == ["a", "b"]


def test_each_mode_sets_its_quantization_over_the_command_lines() -> None:
    parser = benchmark_parser(None)
    add_workload_args(parser)
    args = parser.parse_args(["--device", "cpu", "--quantization", "fp8", "--kv-cache-dtype", "fp8"])

    unquantized = mode_settings(args, "bf16")
    assert (unquantized.quantization, unquantized.kv_cache_dtype) == (None, WorkerConfig.kv_cache_dtype)
    both = mode_settings(args, "awq+fp8-kv")
    assert (both.quantization, both.kv_cache_dtype) == ("awq", "fp8")
    assert both.device == "cpu"
    with pytest.raises(SystemExit, match="fp4"):
        mode_settings(args, "fp4")


@pytest.mark.e2e
def test_modes_serve_the_whole_workload_through_grpc(embedded_model_dir: Path, tmp_path: Path) -> None:
    num_seqs, min_len, max_len = 2, 4, 8
    summary, printed = run_benchmark(
        "quantized_throughput",
        *("--device", "cpu", "--model", str(embedded_model_dir), "--swap-space", "0", "--grpc-clients", "1"),
        *("--num-seqs", str(num_seqs), "--min-len", str(min_len), "--max-len", str(max_len)),
        *("--modes", "bf16,fp8+fp8-kv", "--repeats", "1", "--log-dir", str(tmp_path / "logs")),
        out=tmp_path / "quantized_throughput.json",
    )

    expected_tokens = nano_vllm_workload(num_seqs, min_len, max_len).num_output_tokens
    assert [run["mode"] for run in summary["runs"]] == ["bf16", "fp8+fp8-kv"]
    for run in summary["runs"]:
        assert run["error"] is None
        assert run["output_tokens"] == expected_tokens
        assert run["tokens_per_second"] == pytest.approx(expected_tokens / run["seconds"])
    modes = summary["modes"]
    assert modes["bf16"]["ratio_to_first"] == 1.0
    assert modes["fp8+fp8-kv"]["ratio_to_first"] == pytest.approx(
        modes["fp8+fp8-kv"]["mean"] / modes["bf16"]["mean"]
    )
    assert "fp8+fp8-kv" in printed and "bf16" in printed
