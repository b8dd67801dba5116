"""The front door under requests too large to serve: a 50 MB prompt is refused at once
(by gRPC from the message's length, by the HTTP API from the body's), a prompt just small
enough to be read but too long to fit a sequence is refused before it is tokenized, and
the longest text that may fit is tokenized off the event loop; meanwhile other streams
keep their pace and the tokenizer's memory stays bounded."""

import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from pagedserve.v1 import common_pb2, generation_pb2

from services.common.channels import DEFAULT_MAX_REQUEST_BYTES
from tests.support.service_stack import Stack, service_stack

HUGE_PROMPT = "a" * (50 * 1024 * 1024)
# Most stream gap a refusal or a long tokenization may cause (steps on a shared CPU take
# tens of milliseconds).
# The aim is 1 s; an idle 2-core machine shows about 1.7 s (benchmarks/RESULTS.md). The
# bound catches a return of the whole-prompt stall (15 s before the limits).
MAX_STREAM_GAP_S = 3.0
STREAMS = 3


@pytest.fixture(scope="module")
def limits_stack(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    with service_stack(embedded_model_dir, tmp_path_factory.mktemp("front-door"), http_api=True) as running:
        yield running


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PacedStreams:
    """Greedy generations streaming in threads, each message's arrival time kept."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self.arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
        self._threads = [threading.Thread(target=self._run, args=(index,)) for index in range(STREAMS)]

    def _run(self, index: int) -> None:
        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        request = generation_pb2.GenerateRequest(
            prompt=f"Count to a hundred, take {index}:", sampling=sampling
        )
        for _ in self._stack.generation.Generate(request, timeout=300):
            self.arrivals[index].append(time.monotonic())

    def __enter__(self) -> "PacedStreams":
        for thread in self._threads:
            thread.start()
        # Under way before anything else is sent.
        while not all(len(arrivals) >= 3 for arrivals in self.arrivals):
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        for thread in self._threads:
            thread.join()

    def max_gap_s(self) -> float:
        return max(b - a for arrivals in self.arrivals for a, b in zip(arrivals, arrivals[1:]))


def _refused(stack: Stack, request: generation_pb2.GenerateRequest) -> tuple[grpc.RpcError, float]:
    """The refusal of `request` and the fastest of three in seconds, from the first byte
    sent (serialized beforehand: the client's own work is not the server's)."""
    data = request.SerializeToString()
    times: list[float] = []
    with grpc.insecure_channel(stack.public_address) as channel:
        generate = channel.unary_stream("/pagedserve.v1.Generation/Generate")
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                list(generate(data, timeout=60))
            times.append(time.monotonic() - started)
    return refused.value, min(times)


def _http_refused(stack: Stack, body: bytes) -> tuple[httpx.Response, float]:
    times: list[float] = []
    for _ in range(3):
        started = time.monotonic()
        reply = httpx.post(f"{stack.http_url}/completions", content=body, timeout=60)
        times.append(time.monotonic() - started)
    return reply, min(times)


def test_huge_and_overlong_prompts_are_refused_while_streams_keep_their_pace(limits_stack: Stack) -> None:
    tokenizer_pid = limits_stack.processes["tokenizer"].pid
    rss_before = _rss_mb(tokenizer_pid)
    with PacedStreams(limits_stack) as streams:
        huge, huge_s = _refused(limits_stack, generation_pb2.GenerateRequest(prompt=HUGE_PROMPT))
        assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, huge.details()
        body = b'{"model": "m", "prompt": "' + HUGE_PROMPT.encode() + b'"}'
        reply, http_s = _http_refused(limits_stack, body)
        assert reply.status_code == 413, reply.text
        assert f"limit of {DEFAULT_MAX_REQUEST_BYTES} bytes" in reply.json()["error"]["message"]

        # Read whole, but longer than any sequence in any tokenization.
        overlong = "a" * (DEFAULT_MAX_REQUEST_BYTES - 1024)
        error, overlong_s = _refused(limits_stack, generation_pb2.GenerateRequest(prompt=overlong))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt: has" in error.details() and "can fit a sequence" in error.details()

        # The longest text that might fit is tokenized, off the loop, then refused in tokens.
        longest = " ".join(["word"] * (8192 * 81 // 5))
        error, _ = _refused(limits_stack, generation_pb2.GenerateRequest(prompt=longest))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens" in error.details()
        tokenized = limits_stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=longest[:200_000]))
        assert len(tokenized.token_ids) > 8192
    gap_s = streams.max_gap_s()
    growth = _rss_mb(tokenizer_pid) - rss_before
    print(
        f"50 MB prompt refused in {huge_s * 1000:.0f} ms (gRPC), {http_s * 1000:.0f} ms (HTTP); "
        f"a prompt too long to fit in {overlong_s * 1000:.0f} ms; longest stream gap "
        f"{gap_s * 1000:.0f} ms; tokenizer RSS {rss_before:.0f} MB + {growth:.0f} MB"
    )
    # Seen from the client, which serializes and uploads what it sends before it reads the
    # answer: the server refuses a 50 MB message from its length prefix, but the client
    # spends about 0.3 s on its own side here (benchmarks/RESULTS.md).
    for name, seconds, limit_s in (
        ("gRPC", huge_s, 1.0),
        ("HTTP", http_s, 1.0),
        ("too long to fit", overlong_s, 0.1),
    ):
        assert seconds < limit_s, f"{name}: the refusal took {seconds * 1000:.0f} ms"
    assert gap_s < MAX_STREAM_GAP_S, f"a stream stalled for {gap_s:.2f}s"
    assert growth < 300, f"the tokenizer grew by {growth:.0f} MB"


def test_tokenize_and_detokenize_are_bounded(limits_stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        limits_stack.generation.Tokenize(generation_pb2.TokenizeRequest(text="a" * 1_000_000))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("text: has 1000000 characters")
    with pytest.raises(grpc.RpcError) as refused:
        limits_stack.generation.Detokenize(generation_pb2.DetokenizeRequest(token_ids=[42] * 8193))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        refused.value.details() == "token_ids: at most 8192 ids (the longest sequence) are allowed, got 8193"
    )
