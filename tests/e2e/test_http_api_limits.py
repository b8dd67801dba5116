"""The HTTP API's refusals that need a stack of their own: an API key (401), a served
model name, a full queue (429) and draining on SIGTERM (503), on a scheduler that runs
one sequence at a time and queues at most one more."""

import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from pagedserve.v1 import scheduler_pb2

from tests.support.service_stack import Stack, service_stack

API_KEY = "test-key"
SERVED_NAME = "tiny-chat"


@pytest.fixture(scope="module")
def limited_stack(embedded_model_dir: Path, tmp_path_factory) -> Stack:
    with service_stack(
        embedded_model_dir,
        tmp_path_factory.mktemp("http-limits"),
        scheduler_args=["--max-num-seqs", "1", "--max-waiting-requests", "1"],
        tokenizer_args=["--api-key", API_KEY, "--served-model-name", SERVED_NAME, "--shutdown-grace", "60"],
        http_api=True,
    ) as running:
        yield running


def _client(stack: Stack, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.http_url, api_key=api_key, max_retries=0, timeout=300)


def _wait_for(stack: Stack, running: int, waiting: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
        if (stats.num_running, stats.num_waiting) == (running, waiting):
            return
        assert time.monotonic() < deadline, f"scheduler stuck at {stats}"
        time.sleep(0.05)


def test_wrong_or_missing_api_key_gets_401(limited_stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(limited_stack, "wrong").models.list()
    assert refused.value.status_code == 401
    assert refused.value.body["code"] == "invalid_api_key"
    no_key = httpx.get(f"{limited_stack.http_url}/models")
    assert no_key.status_code == 401
    # Probes need no key.
    assert httpx.get(f"{limited_stack.http_url.removesuffix('/v1')}/health").status_code == 200


def test_served_model_name_is_the_model_id(limited_stack: Stack) -> None:
    client = _client(limited_stack)
    assert [model.id for model in client.models.list().data] == [SERVED_NAME]
    reply = client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2)
    assert reply.model == SERVED_NAME


def test_full_queue_gets_429_and_draining_gets_503(limited_stack: Stack) -> None:
    client = _client(limited_stack)
    running = client.completions.create(
        model=SERVED_NAME, prompt="Count:", max_tokens=48, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = [next(iter(running))]
    queued_answer: list[str] = []
    queued = threading.Thread(
        target=lambda: queued_answer.append(
            client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2).choices[0].finish_reason
        )
    )
    queued.start()
    _wait_for(limited_stack, running=1, waiting=1)
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2)
    assert refused.value.status_code == 429

    limited_stack.processes["tokenizer"].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2)
        except openai.InternalServerError as error:
            assert error.status_code == 503
            break
        except openai.RateLimitError:
            pass  # the signal is not handled yet, and the queue is still full
        assert time.monotonic() < deadline, "new requests were still admitted after SIGTERM"
        time.sleep(0.05)
    # What was admitted before finishes.
    chunks.extend(running)
    assert chunks[-1].choices[0].finish_reason == "length"
    queued.join(timeout=120)
    assert queued_answer == ["length"]
    assert limited_stack.processes["tokenizer"].wait(timeout=60) == 0
