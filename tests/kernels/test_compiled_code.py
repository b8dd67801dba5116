"""What the sm_90 code of the kernels must keep, compiled on this machine as
tests/kernels/test_kernels_compile.py compiles them: the occupancy, loads and copies that
their speed on the device was measured with."""

from __future__ import annotations

import pytest

from tests.kernels.test_kernels_compile import CUOBJDUMP, _compile, _cuobjdump, _resource_usage


def test_decode_attention_keeps_four_programs_per_multiprocessor() -> None:
    """With 64-key tiles the decode attention kernel takes 128 registers per thread and 39 KB
    of shared memory, so four programs share a multiprocessor (Nsight Compute on the H200:
    25% occupancy, warps waiting on loads half the time). A change that needs more would cut
    that to three and the kernel's bandwidth with it."""
    compiled = _compile("decode attention")
    if not CUOBJDUMP.exists():
        pytest.skip("Triton's wheel carries no cuobjdump here")
    registers = int(_resource_usage(compiled.asm["cubin"]).split("REG:")[1].split()[0])
    threads = 32 * compiled.metadata.num_warps
    assert 65536 // (registers * threads) >= 4, f"{registers} registers per thread"
    assert 228 * 1024 // (compiled.metadata.shared + 1024) >= 4, (
        f"{compiled.metadata.shared} bytes of shared memory"
    )


def test_fp8_cache_decode_attention_reads_no_single_bytes_from_shared_memory() -> None:
    """Values stored [head, dim, slot] within a block let the second dot product take an
    fp8 tile as it was copied; with values [slot, head, dim] the compiler gathered each
    key pair's bytes one load at a time (231 shared loads a 128-key tile, against 54 for
    bf16) and the kernel read half bf16's bytes in 91% of its time (H200)."""
    compiled = _compile("decode attention, fp8 cache")
    if not CUOBJDUMP.exists():
        pytest.skip("Triton's wheel carries no cuobjdump here")
    sass = _cuobjdump(compiled.asm["cubin"], "--dump-sass")
    assert "LDS.U8" not in sass
    assert "LDGSTS.E.BYPASS.128" in sass, "tiles are no longer copied in 16-byte pieces"


def test_fp8_cache_decode_attention_multiplies_in_fp8_when_told() -> None:
    """With fp8_products the decode over an fp8 cache gives the tensor cores e4m3 operands
    (QGMMA), its keys and values as they were copied: widening each to fp16 takes 136 of
    the 802 instructions a warp runs per 128-key tile, and placing the fp16 probabilities
    into the second product's operands 130 more. Its only conversions left pack the query
    and the probabilities into e4m3."""
    compiled = _compile("decode attention, fp8 cache, e4m3 products")
    if not CUOBJDUMP.exists():
        pytest.skip("Triton's wheel carries no cuobjdump here")
    sass = _cuobjdump(compiled.asm["cubin"], "--dump-sass")
    assert "QGMMA" in sass and ".E4M3.E4M3" in sass
    assert "HMMA" not in sass and "HGMMA" not in sass
    conversions = {line.split()[1] for line in sass.splitlines() if "F2FP" in line}
    assert conversions == {"F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C"}, conversions


def test_pipelined_gemv_copies_its_tiles_asynchronously() -> None:
    """The one-row 4-bit kernel's LOAD_STAGES pipelines its loop's loads through shared
    memory (Triton does so for loads that feed no tl.dot only when the loop itself asks),
    so that later steps' weights are on their way while this one's are opened; with one
    stage every load is a plain one into registers."""
    pipelined = _compile("4-bit matrix-vector product, loads pipelined")
    plain = _compile("4-bit matrix-vector product")
    if not CUOBJDUMP.exists():
        pytest.skip("Triton's wheel carries no cuobjdump here")
    assert "LDGSTS" in _cuobjdump(pipelined.asm["cubin"], "--dump-sass")
    assert "LDGSTS" not in _cuobjdump(plain.asm["cubin"], "--dump-sass")
    # Its shared memory leaves room for six programs a multiprocessor (registers: eight).
    assert 228 * 1024 // (pipelined.metadata.shared + 1024) >= 6, f"{pipelined.metadata.shared} bytes"
