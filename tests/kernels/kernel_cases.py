"""Triton kernels against their PyTorch references (run by tests/kernels/test_kernels.py).

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors (fp32,
small shapes); with CUDA they are compiled and run in bf16 at model-like shapes. Triton
fixes interpreter or compiler for each function when it is defined, its own library
included, so TRITON_INTERPRET must be set before triton is first imported:
tests/kernels/test_kernels.py runs this file in a fresh interpreter with it set. Run directly,
this module sets it itself (before importing triton) and restores it after its tests.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
import torch

ON_GPU = torch.cuda.is_available()
_previous_interpret = os.environ.get("TRITON_INTERPRET")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from gpu_worker.kernels.triton_decode_attention import decode_attention_triton
    from gpu_worker.kernels.triton_elementwise import add_rms_norm_triton, silu_and_mul_triton
    from gpu_worker.kernels.triton_linear import linear_partial_sums, split_k_plan, total_of
    from gpu_worker.kernels.triton_prefill_attention import prefill_attention_triton
finally:
    if _previous_interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous_interpret

from gpu_worker.kernels.attention_backend import fresh_prefill_kernel  # noqa: E402
from gpu_worker.kernels.elementwise import (  # noqa: E402
    add_rms_norm_reference,
    silu_and_mul_reference,
)
from gpu_worker.kernels.paged_attention import (  # noqa: E402
    paged_attention,
    store_kv,
)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEAD_DIM = 128 if ON_GPU else 16
BLOCK_SIZE = 16 if ON_GPU else 4
# bf16 inputs against an fp32 reference of the same inputs; fp32 against fp32.
TOLERANCE = dict(atol=2e-2, rtol=2e-2) if ON_GPU else dict(atol=1e-4, rtol=1e-4)


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array there) into a Python int
    with int(array), which NumPy 2.4 refuses; loops with run-time bounds need it."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "scalar_index_patched", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.scalar_index_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _patch_interpreter_fp8_rounding() -> None:
    """Triton 3.6's interpreter rounds to float8 by hand and loses the carry of a mantissa
    that rounds up into the exponent (1.95 becomes 1.0 where the device gives 2.0). Here
    PyTorch rounds instead, to nearest even, as the device's conversion does."""
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "fp8_rounding_patched", False):
        return
    float8 = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
    wide = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype.name not in float8 or input_dtype.name not in wide:
            return original(input, input_dtype, output_dtype, rounding_mode)
        values = torch.from_numpy(input.copy()).view(wide[input_dtype.name])
        return values.to(float8[output_dtype.name]).view(torch.uint8).numpy().reshape(input.shape)

    convert_float.fp8_rounding_patched = True
    interpreter._convert_float = convert_float


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter_on_cpu():
    if ON_GPU:
        yield
        return
    _patch_interpreter_scalar_index()
    _patch_interpreter_fp8_rounding()
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))


class PagedBatch:
    """A random paged KV cache holding `seq_lens` contexts in shuffled blocks, with the
    batch's last `query_lens` tokens of each sequence as queries."""

    def __init__(
        self, seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int, seed: int
    ):
        generator = torch.Generator().manual_seed(seed)
        num_blocks = sum(-(-n // BLOCK_SIZE) for n in seq_lens) + 3
        shape = (num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
        # NaN in every key slot nobody writes: a kernel reading one poisons its output.
        # An fp8 cache's values (cache_layout_cases.py) are read a block at a time, past a
        # sequence's end too, and must be finite there (kernels/triton_paged_kv.py): a
        # large one shows any weight given to it.
        self.key_cache = torch.full(shape, float("nan"), dtype=DTYPE, device=DEVICE)
        self.value_cache = torch.full(shape, 400.0, dtype=DTYPE, device=DEVICE)
        free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(free_blocks)
        tables, slots = [], []
        for seq_len in seq_lens:
            blocks = [free_blocks.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
            tables.append(blocks)
            slots.extend(blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len))
        keys = torch.randn(len(slots), num_kv_heads, HEAD_DIM, generator=generator).to(DEVICE, DTYPE)
        values = torch.randn(len(slots), num_kv_heads, HEAD_DIM, generator=generator).to(DEVICE, DTYPE)
        # The cache slot of each context token, sequence after sequence.
        self.slots = torch.tensor(slots, device=DEVICE)
        store_kv(keys, values, self.key_cache, self.value_cache, self.slots)
        width = max(max(len(t) for t in tables), 1) + 2
        self.block_tables = torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE
        )
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        self.query_start_loc = (
            torch.tensor([0] + query_lens, dtype=torch.int32, device=DEVICE).cumsum(0).to(torch.int32)
        )
        self.query = torch.randn(sum(query_lens), num_heads, HEAD_DIM, generator=generator).to(DEVICE, DTYPE)
        self.scale = HEAD_DIM**-0.5

    def reference(
        self, sliding_window: int | None = None, logit_softcap: float | None = None
    ) -> torch.Tensor:
        return paged_attention(*self._paged_inputs(), sliding_window, logit_softcap)

    def decode(self, seq_lens: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
        """The Triton decode kernel over this batch, or over it with other seq_lens."""
        return decode_attention_triton(
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.seq_lens if seq_lens is None else seq_lens,
            self.scale,
            **options,
        )

    def prefill(self, **options: Any) -> torch.Tensor:
        """The Triton paged prefill kernel over this batch."""
        return prefill_attention_triton(*self._paged_inputs(), **options)

    def _paged_inputs(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The arguments that paged_attention and the prefill kernel both begin with."""
        return (
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.query_start_loc,
            self.seq_lens,
            self.scale,
        )


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 2), (16, 8)])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("block_n", [64, 128] if ON_GPU else [16, 32])
def test_decode_attention_matches_reference(
    num_heads: int, num_kv_heads: int, num_splits: int, block_n: int
) -> None:
    seq_lens = [1, 7, BLOCK_SIZE, 3 * BLOCK_SIZE + 1, 70] if not ON_GPU else [1, 17, 300, 1024, 2000, 64]
    batch = PagedBatch(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, seed=num_heads + num_splits)
    output = batch.decode(
        num_splits=num_splits,
        block_n=block_n,
    )
    assert not output.isnan().any()
    torch.testing.assert_close(output.float(), batch.reference().float(), **TOLERANCE)


def test_decode_attention_padding_rows_are_zero() -> None:
    batch = PagedBatch([5, 9], [1, 1], 4, 2, seed=3)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 2):
        output = batch.decode(
            seq_lens,
            num_splits=num_splits,
            block_n=16,
        )
        assert (output[1] == 0).all()
        torch.testing.assert_close(output[0].float(), batch.reference()[0].float(), **TOLERANCE)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 2), (4, 4)])
def test_prefill_attention_matches_reference_on_mixed_batch(num_heads: int, num_kv_heads: int) -> None:
    # Full prefill, a chunk over a cached prefix, decodes, a chunk longer than one tile.
    if ON_GPU:
        shapes = [(700, 700), (1500, 333), (900, 1), (17, 1), (128, 128), (2000, 1000)]
    else:
        shapes = [(7, 7), (13, 5), (9, 1), (1, 1), (40, 37)]
    batch = PagedBatch(
        [s for s, _ in shapes], [q for _, q in shapes], num_heads, num_kv_heads, seed=num_heads
    )
    output = batch.prefill(
        block_n=16 if not ON_GPU else 64,
    )
    assert not output.isnan().any()
    torch.testing.assert_close(output.float(), batch.reference().float(), **TOLERANCE)


# Windows shorter than a tile, than a block, and reaching back across split boundaries; a
# cap low enough that tanh bends the random scores.
WINDOW_SOFTCAP_CASES = [(5, None), (None, 2.0), (3, 2.0), (BLOCK_SIZE * 4 + 1, None)]


@pytest.mark.parametrize("sliding_window,logit_softcap", WINDOW_SOFTCAP_CASES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_window_and_softcap(
    sliding_window: int | None, logit_softcap: float | None, num_splits: int
) -> None:
    seq_lens = [1, 7, 3 * BLOCK_SIZE + 1, 70] if not ON_GPU else [1, 17, 300, 2000]
    batch = PagedBatch(seq_lens, [1] * len(seq_lens), 4, 2, seed=num_splits)
    output = batch.decode(
        sliding_window=sliding_window,
        logit_softcap=logit_softcap,
        num_splits=num_splits,
        block_n=16 if not ON_GPU else 64,
    )
    assert not output.isnan().any()
    expected = batch.reference(sliding_window, logit_softcap).float()
    assert _relative_error(expected, batch.reference().float()) > 1e-2, "the options change nothing"
    torch.testing.assert_close(output.float(), expected, **TOLERANCE)


@pytest.mark.parametrize("sliding_window,logit_softcap", WINDOW_SOFTCAP_CASES)
def test_prefill_attention_window_and_softcap(
    sliding_window: int | None, logit_softcap: float | None
) -> None:
    if ON_GPU:
        shapes = [(700, 700), (1500, 333), (900, 1), (2000, 1000)]
    else:
        shapes = [(7, 7), (13, 5), (9, 1), (40, 37)]
    batch = PagedBatch([s for s, _ in shapes], [q for _, q in shapes], 4, 2, seed=5)
    output = batch.prefill(
        sliding_window=sliding_window,
        logit_softcap=logit_softcap,
        block_n=16 if not ON_GPU else 64,
    )
    assert not output.isnan().any()
    torch.testing.assert_close(
        output.float(), batch.reference(sliding_window, logit_softcap).float(), **TOLERANCE
    )


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(with_residual: bool) -> None:
    hidden = 1024 if ON_GPU else 48
    x = torch.randn(7, hidden, device=DEVICE).to(DTYPE)
    residual = torch.randn(7, hidden, device=DEVICE).to(DTYPE) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(DTYPE)
    out, new_residual = add_rms_norm_triton(x, residual, weight, 1e-6)
    expected, expected_residual = add_rms_norm_reference(x, residual, weight, 1e-6)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    if with_residual:
        assert torch.equal(new_residual, expected_residual)


@pytest.mark.parametrize("num_rows, num_splits", [(1, 4), (20, 2), (37, 1)])
def test_linear_partial_sums_add_up_to_the_matmul(num_rows: int, num_splits: int) -> None:
    out_features, in_features = (1024, 3072) if ON_GPU else (80, 512)
    x = torch.randn(num_rows, in_features, device=DEVICE).to(DTYPE)
    weight = (0.05 * torch.randn(out_features, in_features, device=DEVICE)).to(DTYPE)
    partials = linear_partial_sums(x, weight, num_splits, block_m=16, block_n=32)
    assert partials.shape == (num_splits, num_rows, out_features) and partials.dtype == torch.float32
    expected = x.double() @ weight.double().T
    assert _relative_error(partials.sum(dim=0), expected) < (1e-2 if ON_GPU else 1e-5)


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_total_of_partials_is_their_sum_in_the_asked_dtype(num_splits: int) -> None:
    # 1,500 columns: not a multiple of the kernel's block, so its mask is exercised.
    partials = torch.randn(num_splits, 3, 1500, device=DEVICE)
    total = total_of(partials, DTYPE)
    assert total.shape == (3, 1500) and total.dtype == DTYPE
    expected = partials.double().sum(dim=0).to(DTYPE)
    # fp32 sums in another order round differently only past bf16's precision.
    assert torch.allclose(total.float(), expected.float(), rtol=1e-2, atol=1e-2)
    # In fp32 it adds the slices in order, as a loop over them does.
    in_order = torch.zeros_like(partials[0])
    for split in partials:
        in_order += split
    assert torch.equal(total_of(partials, torch.float32), in_order)


def test_split_k_plans_divide_the_reduction_and_fill_the_device() -> None:
    for num_rows in (1, 16, 48, 128):
        for out_features, in_features in ((1024, 2048), (1024, 3072)):
            plan = split_k_plan(num_rows, out_features, in_features)
            assert plan is not None and in_features % (plan["num_splits"] * 128) == 0
            tiles = -(-num_rows // plan["block_m"]) * -(-out_features // plan["block_n"])
            assert tiles * plan["num_splits"] >= 128
    assert split_k_plan(4096, 1024, 3072) is None


def test_add_rms_norm_sums_projection_partials() -> None:
    hidden = 1024 if ON_GPU else 48
    partials = torch.randn(3, 5, hidden, device=DEVICE)
    residual = torch.randn(5, hidden, device=DEVICE).to(DTYPE)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(DTYPE)
    out, new_residual = add_rms_norm_triton(partials, residual, weight, 1e-6)
    expected, expected_residual = add_rms_norm_reference(partials.sum(0).to(DTYPE), residual, weight, 1e-6)
    assert out.dtype == DTYPE and new_residual.dtype == DTYPE
    torch.testing.assert_close(out, expected, **TOLERANCE)
    torch.testing.assert_close(new_residual, expected_residual, **TOLERANCE)
    # The reference takes partials too, as the CPU path of the same model code.
    reference_out, _ = add_rms_norm_reference(partials, residual, weight, 1e-6)
    torch.testing.assert_close(reference_out, expected, **TOLERANCE)


def test_silu_and_mul_matches_reference() -> None:
    x = torch.randn(6, 2 * (3072 if ON_GPU else 40), device=DEVICE).to(DTYPE)
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_reference(x), **TOLERANCE)


@pytest.mark.skipif(not ON_GPU, reason="flash-attn / PyTorch varlen attention need CUDA")
def test_fresh_prefill_kernel_matches_reference() -> None:
    kernel = fresh_prefill_kernel()
    if kernel is None:
        pytest.skip("no varlen attention kernel in this environment")
    query_lens = [300, 1, 1024, 77]
    batch = PagedBatch(query_lens, query_lens, 16, 8, seed=5)
    # Every token is a query: the whole context is this step's keys and values.
    key = batch.key_cache.view(-1, 8, HEAD_DIM)[batch.slots]
    value = batch.value_cache.view(-1, 8, HEAD_DIM)[batch.slots]
    output = kernel(batch.query, key, value, batch.query_start_loc, max(query_lens), batch.scale)
    assert _relative_error(output, batch.reference()) < 2e-2
