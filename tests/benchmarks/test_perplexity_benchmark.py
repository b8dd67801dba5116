"""The perplexity benchmark on CPU with the embedded model: its unquantized perplexity is
HF transformers' on the same windows, and a quantized mode's is its own, close to it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.perplexity import text_windows

REPO_ROOT = Path(__file__).resolve().parents[2]
WINDOW = 128


def hf_perplexity(model, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(torch.tensor([window])).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(window[1:])
            total += logprobs[torch.arange(len(targets)), targets].sum().item()
            count += len(targets)
    return math.exp(-total / count)


@pytest.mark.hf
def test_perplexity_matches_hf_and_quantization_raises_it(
    embedded_model_dir: Path, hf_embedded_model, tmp_path: Path
) -> None:
    out = tmp_path / "perplexity.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.perplexity",
            "--device",
            "cpu",
            "--modes",
            "unquantized,int8",
            "--window",
            str(WINDOW),
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    modes = json.loads(out.read_text())["modes"]
    windows = text_windows(embedded_model_dir, WINDOW)
    assert modes["unquantized"]["tokens"] == sum(len(w) - 1 for w in windows) > 800
    expected = hf_perplexity(hf_embedded_model, windows)
    assert modes["unquantized"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    # int8 rounding moves the perplexity, by little.
    assert modes["int8"]["perplexity"] != modes["unquantized"]["perplexity"]
    assert modes["int8"]["relative"] == pytest.approx(1.0, abs=0.05)
