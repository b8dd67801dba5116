"""Host buffers through which a step's inputs reach the device, one copy per dtype.

A step's inputs of one dtype are written into segments of one host buffer and copied to
the device together, then cut back into tensors there: one copy instead of one small copy
per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Triton compiles a kernel variant per pointer alignment (16 bytes or not): every tensor cut
# from a staging buffer starts on a 16-byte boundary, so that steps of different sizes
# reuse one variant instead of compiling new ones mid-run.
_ALIGNMENT_BYTES = 16


class StagingBuffer:
    """A host buffer of one dtype, cut into segments that are copied to the device at once.

    On CUDA the buffer is pinned and rewritten only once the copy out of it last time is
    done. It is sized up front for the largest step (capacity_sizes: its segments'
    lengths): growing it mid-run allocates page-locked memory, which CUDA counts among its
    implicitly synchronizing operations. On CPU the device tensors alias the host arrays,
    so each step gets arrays of its own."""

    def __init__(self, dtype: torch.dtype, device: torch.device, capacity_sizes: Sequence[int] = ()) -> None:
        self.dtype = dtype
        self.device = device
        self._cuda = device.type == "cuda"
        self._itemsize = dtype.itemsize
        self._numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        capacity = aligned_offsets(capacity_sizes, self._itemsize)[-1] if self._cuda else 0
        self.buffer = torch.empty(capacity, dtype=dtype, pin_memory=capacity > 0)
        self.copied: torch.cuda.Event | None = None
        # The segments handed out last: the host array holding them, their starts (and the
        # total as the last entry) and their lengths.
        self._host = np.empty(0, dtype=self._numpy_dtype)
        self._offsets = [0]
        self._sizes: Sequence[int] = ()

    def host_segments(self, sizes: Sequence[int]) -> list[np.ndarray]:
        """Host arrays of these lengths, to write a step's inputs into."""
        offsets = aligned_offsets(sizes, self._itemsize)
        host = self._host_array(offsets[-1])
        self._host, self._offsets, self._sizes = host, offsets, sizes
        return [host[start : start + size] for start, size in zip(offsets, sizes)]

    def to_device(self) -> list[torch.Tensor]:
        """Copies the segments last handed out (queued, on CUDA) and returns them as
        tensors on the device."""
        offsets, sizes = self._offsets, self._sizes
        if self._cuda:
            tensor = self.buffer[: offsets[-1]].to(self.device, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            tensor = torch.from_numpy(self._host)
        # One split into segments and their padding (every other piece), which costs less
        # than one slice per segment.
        pieces: list[int] = []
        for start, size, next_start in zip(offsets, sizes, offsets[1:]):
            pieces += [size, next_start - start - size]
        return list(tensor.split_with_sizes(pieces)[::2])

    def _host_array(self, size: int) -> np.ndarray:
        if not self._cuda:
            return np.empty(size, dtype=self._numpy_dtype)
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        if self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, 2 * self.buffer.numel()), dtype=self.dtype, pin_memory=True)
        return self.buffer[:size].numpy()


def aligned_offsets(sizes: Sequence[int], itemsize: int) -> list[int]:
    """Start of each segment, and the total as the last entry."""
    step = _ALIGNMENT_BYTES // itemsize
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // step) * step)
    return offsets
