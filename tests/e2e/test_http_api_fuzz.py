"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis):
whatever the bodies, no 5xx and no crash, and the server still answers afterwards.
Generation is kept short (a 64-token model length, and the generated bodies' token
counts, n and prompt batches capped) so that the run stays small on a CPU."""

from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.support.service_stack import Stack, service_stack

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def fuzz_stack(embedded_model_dir: Path, tmp_path_factory) -> Stack:
    with service_stack(
        embedded_model_dir,
        tmp_path_factory.mktemp("http-fuzz"),
        worker_args=["--max-model-len", "64"],
        http_api=True,
    ) as running:
        yield running


def _bounded(body: object) -> None:
    """Caps what makes a valid request slow on a CPU, leaving everything else as drawn."""
    if not isinstance(body, dict):
        return
    # Another model's name ends every request at the 404 check; the rest is worth reaching.
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            body[key] = min(body[key], 4)
    if "max_tokens" not in body:
        body["max_tokens"] = 4
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    if isinstance(body.get("prompt"), list) and body["prompt"] and isinstance(body["prompt"][0], (str, list)):
        body["prompt"] = body["prompt"][:2]


def test_no_server_errors(fuzz_stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_stack.http_url.removesuffix('/v1')}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/v1/completions", "/v1/chat/completions"}
    statuses: Counter[tuple[str, int]] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy())
        # Derandomized: the same draws every run, which are known to reach generation.
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        def no_server_error(case) -> None:
            _bounded(case.body)
            response = case.call_and_validate(checks=[not_a_server_error], timeout=120)
            statuses[case.operation.path, response.status_code] += 1

        no_server_error()
    # The fuzzing reached generation, not only the refusals.
    assert statuses["/v1/completions", 200] and statuses["/v1/chat/completions", 200], statuses


def test_still_serving_after_fuzzing(fuzz_stack: Stack) -> None:
    reply = httpx.post(
        f"{fuzz_stack.http_url}/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
        timeout=120,
    )
    assert reply.status_code == 200
    assert all(process.poll() is None for process in fuzz_stack.processes.values())
