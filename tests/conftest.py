from pathlib import Path

import pytest

from services.common.embedded_model import materialize_default_model


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


@pytest.fixture(scope="session")
def stack(embedded_model_dir: Path, tmp_path_factory):
    """Tokenizer, scheduler and worker as three processes on loopback, default settings."""
    from service_stack import service_stack

    with service_stack(embedded_model_dir, tmp_path_factory.mktemp("stack")) as running:
        yield running
