"""Runs the kernel cases (tests/kernels/kernel_cases.py, moe_cases.py, int4_cases.py,
fp8_cases.py, cache_layout_cases.py, mixed_attention_cases.py) in a fresh Python process.

Triton decides between its interpreter and its compiler per function when the function is
defined, the functions of triton.language included. Other tests in the session import
triton (transformers does) without the interpreter, so the cases run where
TRITON_INTERPRET=1 is set before anything imports triton, and nothing else sees it.
On a CUDA machine the cases run compiled, and the variable is left unset.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CASES = [
    Path(__file__).with_name(name)
    for name in (
        "kernel_cases.py",
        "moe_cases.py",
        "int4_cases.py",
        "fp8_cases.py",
        "cache_layout_cases.py",
        "mixed_attention_cases.py",
    )
]


@pytest.mark.slow
def test_triton_kernels_match_references() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ)
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--noconftest",
        "-rs",
        *map(str, CASES),
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-8000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout, completed.stdout[-2000:]
