from pathlib import Path

import pytest

from tests.support.service_stack import service_stack


@pytest.fixture(scope="session")
def stack(embedded_model_dir: Path, tmp_path_factory):
    """Tokenizer, scheduler and worker as three processes on loopback, default settings."""
    with service_stack(embedded_model_dir, tmp_path_factory.mktemp("stack")) as running:
        yield running
