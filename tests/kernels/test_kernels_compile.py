"""Every Triton kernel compiles for Hopper (sm_90), with the launch parameters the worker
uses for Qwen3-0.6B, on a machine without a GPU: Triton's compiler and the ptxas in its
wheel need no device. This catches what the interpreter that runs tests/kernels/kernel_cases.py
lets through (a variable whose type differs between the branches of an `if` is fine
there and a compile error on the device), and it keeps registers from spilling to local
memory, which the interpreter cannot see either. Pointers and strides are declared
16-byte aligned, as Triton specializes them at launch: without that the compiler emits
scalar loads and neither registers nor shared memory are what the device runs."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tests.kernels.compile_cases import CASES  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _cuobjdump(cubin: bytes, option: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run(
            [str(CUOBJDUMP), option, file.name], capture_output=True, text=True, check=True
        ).stdout


def _resource_usage(cubin: bytes) -> str:
    listing = _cuobjdump(cubin, "--dump-resource-usage")
    return next(line for line in listing.splitlines() if "REG:" in line)


def _compile(case: str):
    kernel, types, constexprs, options = CASES[case]
    # As the wrappers launch them on Hopper: with programmatic dependent launch wherever
    # the kernel takes it.
    pdl = "PDL" in kernel.arg_names
    if pdl:
        constexprs = dict(constexprs, PDL=True)
    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names
    }
    unspecialized = set(kernel.do_not_specialize) | {
        kernel.arg_names[i] for i in kernel.do_not_specialize if isinstance(i, int)
    }
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if (name.endswith("_ptr") or "stride" in name) and name not in unspecialized
    }
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
        target=HOPPER,
        options=dict(options, launch_pdl=pdl),
    )


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_hopper_without_spilling(case: str) -> None:
    compiled = _compile(case)
    assert compiled.asm["cubin"], case
    if not CUOBJDUMP.exists():
        pytest.skip("Triton's wheel carries no cuobjdump here")
    usage = _resource_usage(compiled.asm["cubin"])
    assert " LOCAL:0 " in usage and " STACK:0 " in usage, f"{case} spills registers: {usage}"
