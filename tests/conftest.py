from pathlib import Path

import pytest

from services.common.embedded_model import materialize_default_model


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The default model, materialized into the default cache so every test session (and
    `pagedserve materialize`) shares one conversion."""
    return materialize_default_model()
