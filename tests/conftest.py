from pathlib import Path

import pytest

from services.common.embedded_model import materialize_default_model

TESTS_DIR = Path(__file__).parent
# Every test in these folders carries the folder's markers, new files included. Whatever is
# under e2e/ starts the services as processes, and benchmarks/ runs the benchmark scripts:
# both run the real model across several processes, which takes minutes on a busy CPU.
MARKERS_BY_FOLDER = {
    "e2e": (pytest.mark.e2e, pytest.mark.slow),
    "benchmarks": (pytest.mark.slow,),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not item.path.is_relative_to(TESTS_DIR):
            continue
        for marker in MARKERS_BY_FOLDER.get(item.path.relative_to(TESTS_DIR).parts[0], ()):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The default model, materialized into the default cache so every test session (and
    `pagedserve materialize`) shares one conversion."""
    return materialize_default_model()


@pytest.fixture(scope="session")
def hf_embedded_model(embedded_model_dir: Path):
    """HF transformers' own implementation of the default model, as the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
