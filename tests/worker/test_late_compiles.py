"""Kernel variants compiled after the worker is ready are counted, by kernel, and logged.

Triton compiles only with a GPU driver, which this machine lacks: the compile events here
are Triton's own call of its post-compile hook (JITFunction._call_hook, which builds the
hook's arguments from the variant as its JIT does after each compile) on a worker kernel,
with the options of a Hopper compile."""

import logging

import pytest
from prometheus_client import CollectorRegistry
from triton import knobs
from triton.backends.nvidia.compiler import CUDAOptions

from gpu_worker.kernels.triton_int4_gemv import _int4_gemv_kernel
from gpu_worker.late_compiles import LateCompiles

COUNTER = "pagedserve:worker_late_kernel_compiles_total"


def _compile_event() -> None:
    """What Triton's JIT runs once it has compiled a variant of _int4_gemv_kernel."""
    kernel = _int4_gemv_kernel
    types = ["*bf16", "*i32", "*bf16", "*bf16", "*fp32"] + ["i32"] * (len(kernel.params) - 5)
    signature = dict(zip(kernel.arg_names, types))
    key = (kernel.arg_names, types)
    kernel._call_hook(
        knobs.runtime.jit_post_compile_hook,
        key,
        signature,
        0,
        {},
        CUDAOptions(num_warps=4),
        [{}],
        False,
    )


def test_compiles_after_start_are_counted_logged_and_passed_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen_by_earlier_hook: list[str] = []
    monkeypatch.setattr(
        knobs.runtime,
        "jit_post_compile_hook",
        lambda **hook_args: seen_by_earlier_hook.append(hook_args["fn"].name),
    )
    earlier_hook = knobs.runtime.jit_post_compile_hook
    registry = CollectorRegistry()
    late_compiles = LateCompiles(registry, rank=1)
    labels = {"kernel": "_int4_gemv_kernel", "rank": "1"}

    # Start-up's compiles are not late.
    _compile_event()
    assert late_compiles.counts == {} and registry.get_sample_value(COUNTER, labels) is None

    late_compiles.start()
    with caplog.at_level(logging.WARNING, logger="gpu_worker.late_compiles"):
        _compile_event()
        _compile_event()
    assert late_compiles.counts == {"_int4_gemv_kernel": 2}
    assert registry.get_sample_value(COUNTER, labels) == 2
    # The log names the variant: its launch options and argument types.
    assert "_int4_gemv_kernel[num_warps=4" in caplog.text and "qweight_ptr: *i32" in caplog.text
    # A hook set before is still called, every time.
    assert seen_by_earlier_hook == ["_int4_gemv_kernel"] * 3

    late_compiles.stop()
    assert knobs.runtime.jit_post_compile_hook is earlier_hook
    _compile_event()
    assert late_compiles.counts == {"_int4_gemv_kernel": 2}
