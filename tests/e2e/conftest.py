from pathlib import Path

import openai
import pytest

from tests.support.service_stack import service_stack


@pytest.fixture(scope="session")
def stack(embedded_model_dir: Path, tmp_path_factory):
    """Tokenizer, scheduler and worker as three processes on loopback, default settings."""
    with service_stack(embedded_model_dir, tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="session")
def http_stack(embedded_model_dir: Path, tmp_path_factory):
    """The three services with the OpenAI-compatible HTTP API on the tokenizer too."""
    with service_stack(embedded_model_dir, tmp_path_factory.mktemp("http"), http_api=True) as running:
        yield running


@pytest.fixture(scope="session")
def client(http_stack) -> openai.OpenAI:
    """The official `openai` client of http_stack's HTTP API."""
    return openai.OpenAI(base_url=http_stack.http_url, api_key="unused", max_retries=0, timeout=300)
