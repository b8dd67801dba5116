"""The throughput table names the kernel variants a run compiled mid-run."""

import pytest

from benchmarks.pagedserve_runs import LATE_COMPILES_KEY
from benchmarks.throughput import print_table


def _entry(name: str, profile: dict[str, float]) -> dict:
    return {
        "name": name,
        "tokens_per_second": 1000.0,
        "ratio_to_pagedserve": None,
        "roofline_fraction": None,
        "bound_with_prompt_flops_fraction": None,
        "seconds": 2.0,
        "note": "",
        "profile": profile,
    }


def test_variants_compiled_during_a_run_are_listed_under_it(capsys: pytest.CaptureFixture[str]) -> None:
    compiled = {LATE_COMPILES_KEY + "_decode_kernel": 2.0, LATE_COMPILES_KEY + "_prefill_kernel": 1.0}
    summary = {
        "device": "CPU",
        "workload": {"num_seqs": 2, "prompt_tokens": 10, "output_tokens": 20},
        "runs": {
            "grpc": _entry("pagedserve gRPC", {"device_busy_s": 1.0, **compiled}),
            "inprocess": _entry("pagedserve in-process", {"device_busy_s": 1.0}),
        },
    }
    print_table(summary)
    lines = capsys.readouterr().out.splitlines()
    listed = [line for line in lines if "compiled during the run" in line]
    assert listed == [
        "pagedserve gRPC: kernel variants first compiled during the run: _decode_kernel ×2, _prefill_kernel ×1"
    ]
