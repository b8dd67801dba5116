"""Score options the Triton attention kernels share (see kernels.paged_attention)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def soft_cap(scores_log2, cap_log2):
    """cap * tanh(score / cap) for scores already multiplied by log2(e) (cap_log2 is cap
    times log2(e) too); tanh(x) as 2 * sigmoid(2x) - 1, which saturates without overflow."""
    return cap_log2 * (2.0 * tl.sigmoid(2.0 * scores_log2 / cap_log2) - 1.0)
