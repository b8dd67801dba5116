"""Kernel variants compiled after the worker is ready.

Triton compiles a kernel once per variant: its constexprs and launch options, and how its
arguments specialize (pointers aligned to 16 bytes, integers equal to 1 or divisible by
16). The worker launches the variants its steps need while it starts (graph capture, the
warm-ups of gpu_worker/kernel_warmup.py); a variant first launched later is compiled, or
read back from Triton's disk cache, inside a step, and every running sequence waits for
it: a compile takes from a fraction of a second to seconds. Each such variant is counted
by kernel (pagedserve:worker_late_kernel_compiles_total) and logged with its
specialization, so that the launch the start-up missed can be found.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from services.common.metrics import PREFIX

log = logging.getLogger(__name__)


class LateCompiles:
    def __init__(self, registry: CollectorRegistry, rank: int = 0) -> None:
        self._rank = str(rank)
        self._counter = Counter(
            PREFIX + "worker_late_kernel_compiles",
            "Kernel variants compiled after the worker was ready; the step that first launched "
            "each waited for its compile.",
            ["kernel", "rank"],
            registry=registry,
        )
        # Also kept here, for the in-process benchmarks, which read no /metrics.
        self.counts: dict[str, int] = {}
        self._previous_hook: Any = None

    def start(self) -> None:
        """Counts every compile from now on: call it once start-up has launched what it
        warms, on a GPU (Triton is imported here, not by a worker on CPU). Triton has one
        hook of this kind; one set before is still called."""
        from triton import knobs

        self._previous_hook = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = self.on_compile

    def stop(self) -> None:
        """Gives Triton's hook back to whatever held it before start."""
        from triton import knobs

        knobs.runtime.jit_post_compile_hook = self._previous_hook

    def on_compile(self, **hook_args: Any) -> None:
        """Triton's jit_post_compile_hook: called by keyword (key, repr, fn, compile,
        is_manual_warmup, already_compiled) after each compile, on the launching thread."""
        kernel = hook_args["fn"].name
        self.counts[kernel] = self.counts.get(kernel, 0) + 1
        self._counter.labels(kernel, self._rank).inc()
        log.warning("kernel variant compiled while serving, its step waited: %s", hook_args["repr"])
        if self._previous_hook is not None:
            self._previous_hook(**hook_args)
