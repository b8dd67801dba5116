"""Programmatic dependent launch (Hopper and later) for the project's Triton kernels.

A decode step is some three hundred small kernels, and between two of them the device
idles while the second one launches. With programmatic dependent launch a kernel's
programs are scheduled while the kernel before it finishes; each then waits
(griddepcontrol.wait) until that kernel has completed and its writes are visible, and at
once lets the kernel after it launch in turn. The wait comes before anything is read, so
no kernel depends on what its predecessors do or do not signal; a kernel launched
without it (cuBLAS, PyTorch) simply runs in stream order. CUDA graphs capture the
dependency as a programmatic edge. One kernel stays in plain stream order, the merge of
decode attention's context splits: it measured slower launched early (see there).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Read at every launch (a CUDA graph keeps what it was at capture): False launches every
# kernel in plain stream order, to measure what overlapping saves.
ENABLED = True


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """The PDL constexpr and launch option for a kernel launched on `device`."""
    if ENABLED and device.type == "cuda" and _supports_pdl(device.index or 0):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
