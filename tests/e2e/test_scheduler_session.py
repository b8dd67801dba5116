"""The scheduler's Session stream, spoken directly as a frontend speaks it: many requests
on one stream, a step's outputs of several requests in one message, refusals as per-request
errors that leave the stream and its other requests alone, and aborts and a dropped stream
that give every KV block back."""

import queue
import signal
import threading
import time
from pathlib import Path

import grpc
from pagedserve.v1 import common_pb2, scheduler_pb2

from services.launcher import is_serving
from tests.support.service_stack import Stack, service_stack


class _Session:
    """A Session call fed from a queue, read on a thread of its own."""

    def __init__(self, stack: Stack) -> None:
        self._outgoing: queue.Queue = queue.Queue()
        self.call = stack.scheduler.Session(iter(self._outgoing.get, None), timeout=120)
        self.responses: list[scheduler_pb2.SessionResponse] = []
        self.error: grpc.RpcError | None = None
        self.handles: dict[str, int] = {}
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.append(response)
        except grpc.RpcError as error:
            self.error = error

    def wait_until_ended(self) -> None:
        self._reader.join(timeout=120)
        assert not self._reader.is_alive(), "the stream did not end"

    def submit(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        request = scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=sampling
        )
        self.handles[request_id] = handle = 100 + len(self.handles)
        self._outgoing.put(
            scheduler_pb2.SessionRequest(submit=scheduler_pb2.SessionSubmit(request=request, handle=handle))
        )

    def abort(self, request_id: str) -> None:
        self._outgoing.put(
            scheduler_pb2.SessionRequest(abort=scheduler_pb2.AbortRequest(request_id=request_id))
        )

    def say_keeps_up(self, keeps_up: bool) -> None:
        load = scheduler_pb2.FrontendLoad(keeps_up=keeps_up)
        self._outgoing.put(scheduler_pb2.SessionRequest(load=load))

    def end(self) -> None:
        """Half-closes: the stream ends once its requests have."""
        self._outgoing.put(None)
        self._reader.join(timeout=120)

    def updates(self, request_id: str) -> list[scheduler_pb2.RequestUpdate]:
        return [u for r in list(self.responses) for u in r.updates if u.request_id == request_id]

    def wait_for(self, predicate, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)


def _all_blocks_free(stack: Stack) -> bool:
    stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
    return stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_requests_share_a_stream_and_its_messages(stack: Stack) -> None:
    session = _Session(stack)
    session.submit("a", [1, 2, 3, 4, 5], max_tokens=12)
    session.submit("b", [6, 7, 8], max_tokens=12)
    session.submit("bad", [5, 10**6], max_tokens=4)
    session.end()
    assert session.error is None

    [refused] = session.updates("bad")
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "prompt_token_ids[1]" in refused.error.message
    assert refused.handle == session.handles["bad"]
    for request_id in ("a", "b"):
        updates = session.updates(request_id)
        assert {u.handle for u in updates} == {session.handles[request_id]}
        assert sum(len(u.output.token_ids) for u in updates) == 12
        assert updates[-1].output.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert all(not u.HasField("error") for u in updates)
    # Decoded in the same steps, their tokens came back in the same messages.
    assert any({u.request_id for u in r.updates} >= {"a", "b"} for r in session.responses)
    reference = list(
        stack.scheduler.Submit(
            scheduler_pb2.SubmitRequest(
                request_id="alone",
                prompt_token_ids=[1, 2, 3, 4, 5],
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            ),
            timeout=60,
        )
    )
    assert [t for u in session.updates("a") for t in u.output.token_ids] == [
        t for r in reference for t in r.token_ids
    ]


def test_an_abort_ends_one_request_and_a_dropped_stream_the_rest(stack: Stack) -> None:
    session = _Session(stack)
    session.submit("stopped", [1, 2, 3], max_tokens=2000)
    session.submit("dropped", [4, 5, 6], max_tokens=2000)
    session.wait_for(lambda: session.updates("stopped") and session.updates("dropped"))
    session.abort("stopped")
    session.wait_for(
        lambda: any(
            u.output.finish_reason == common_pb2.FINISH_REASON_ABORT for u in session.updates("stopped")
        )
    )
    assert not any(u.output.finish_reason for u in session.updates("dropped"))
    session.call.cancel()
    session.end()
    assert session.error is not None and session.error.code() == grpc.StatusCode.CANCELLED
    # Both requests' blocks come back once no step in flight uses them.
    session.wait_for(lambda: _all_blocks_free(stack), timeout_s=30)


def test_a_draining_scheduler_finishes_its_requests_refuses_new_ones_and_ends_the_stream(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    # A grace period no loaded machine comes near: what is tested is that the request in
    # flight finishes, not how fast.
    with service_stack(embedded_model_dir, tmp_path, scheduler_args=["--shutdown-grace", "600"]) as stack:
        session = _Session(stack)
        session.submit("running", [1, 2, 3], max_tokens=64)
        session.wait_for(lambda: session.updates("running"), timeout_s=300)
        stack.processes["scheduler"].send_signal(signal.SIGTERM)
        # The scheduler reports NOT_SERVING (then refuses new calls) on the same turn of its
        # event loop as its open streams start draining.
        session.wait_for(lambda: not is_serving(stack.scheduler_address), timeout_s=300)
        assert not any(u.output.finish_reason for u in session.updates("running"))
        session.submit("late", [4, 5, 6], max_tokens=4)
        session.wait_until_ended()

        assert session.error is None, session.error
        [refused] = session.updates("late")
        assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "shutting down" in refused.error.message
        updates = session.updates("running")
        assert sum(len(u.output.token_ids) for u in updates) == 64
        assert updates[-1].output.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert stack.processes["scheduler"].wait(timeout=30) == 0


def test_each_session_has_its_own_message_budget(embedded_model_dir: Path, tmp_path: Path) -> None:
    # One message per step per session: two sessions of two decoding requests each get a
    # message each a step, so a message carries about two tokens. Were the budget shared,
    # one message a step would carry about four.
    max_tokens = 40
    with service_stack(
        embedded_model_dir, tmp_path, scheduler_args=["--max-stream-messages-per-step", "1"]
    ) as stack:
        sessions = [_Session(stack), _Session(stack)]
        for number, session in enumerate(sessions):
            session.submit(f"s{number}a", [1, 2, 3, number + 4], max_tokens=max_tokens)
            session.submit(f"s{number}b", [5, 6, 7, number + 8], max_tokens=max_tokens)
        for session in sessions:
            session.end()
            assert session.error is None, session.error
        messages = tokens = 0
        for number, session in enumerate(sessions):
            for request_id in (f"s{number}a", f"s{number}b"):
                updates = session.updates(request_id)
                assert sum(len(u.output.token_ids) for u in updates) == max_tokens
                # The first and last messages leave at once, whatever the budget.
                middle = updates[1:-1]
                messages += len(middle)
                tokens += sum(len(u.output.token_ids) for u in middle)
        assert tokens / messages < 3, (tokens, messages)


def _middle_tokens_and_messages(updates: list[scheduler_pb2.RequestUpdate]) -> tuple[int, int]:
    # The first and last messages leave at once, whatever the budget.
    middle = updates[1:-1]
    return sum(len(u.output.token_ids) for u in middle), len(middle)


def test_a_session_that_keeps_up_takes_more_messages_a_step(embedded_model_dir: Path, tmp_path: Path) -> None:
    # One message a step, but the frontend says it keeps up: its two decoding requests get
    # a message each a step, every token with the step that sampled it. A session that
    # says nothing carries about two tokens a message (the test above).
    max_tokens = 30
    with service_stack(
        embedded_model_dir, tmp_path, scheduler_args=["--max-stream-messages-per-step", "1"]
    ) as stack:
        session = _Session(stack)
        session.say_keeps_up(True)
        session.submit("a", [1, 2, 3, 4], max_tokens=max_tokens)
        session.submit("b", [5, 6, 7, 8], max_tokens=max_tokens)
        session.end()
        assert session.error is None, session.error
        for request_id in ("a", "b"):
            updates = session.updates(request_id)
            assert sum(len(u.output.token_ids) for u in updates) == max_tokens
            tokens, messages = _middle_tokens_and_messages(updates)
            assert tokens == messages, (request_id, tokens, messages)


def test_the_tokenizer_says_it_keeps_up_under_a_light_load(embedded_model_dir: Path, tmp_path: Path) -> None:
    # Through the tokenizer: two streams and a budget of one message a step. Nothing waits
    # in its intake and it reads each step's tokens before the next come, so it says it
    # keeps up and the scheduler sends both streams' tokens each step.
    from pagedserve.v1 import generation_pb2

    max_tokens = 30

    def token_counts(prompt: str) -> list[int]:
        request = generation_pb2.GenerateRequest(
            prompt=prompt,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        )
        return [len(response.token_ids) for response in stack.generation.Generate(request, timeout=120)]

    with service_stack(
        embedded_model_dir, tmp_path, scheduler_args=["--max-stream-messages-per-step", "1"]
    ) as stack:
        token_counts("Warm up.")
        counts: dict[str, list[int]] = {}
        threads = [
            threading.Thread(target=lambda p=prompt: counts.__setitem__(p, token_counts(p)))
            for prompt in ("The capital of France is", "Once upon a time")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    assert len(counts) == 2, counts
    for prompt, per_message in counts.items():
        assert sum(per_message) == max_tokens, (prompt, per_message)
        middle = per_message[1:-1]
        # Held to one message a step the two would carry about two tokens a message.
        assert sum(middle) / len(middle) < 1.3, (prompt, per_message)


def test_a_request_id_sent_again_right_after_a_cancel_gets_only_its_own_tokens(stack: Stack) -> None:
    from pagedserve.v1 import generation_pb2

    def request(max_tokens: int) -> generation_pb2.GenerateRequest:
        return generation_pb2.GenerateRequest(
            request_id="retried",
            prompt="Once upon a time",
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        )

    for _ in range(3):
        first = stack.generation.Generate(request(2000), timeout=60)
        next(first)
        first.cancel()
        # The cancel reaches the server a moment later; until then the id is in flight.
        for _ in range(100):
            try:
                again = list(stack.generation.Generate(request(5), timeout=60))
                break
            except grpc.RpcError as refused:
                assert "already in flight" in refused.details(), refused.details()
                time.sleep(0.01)
        assert again[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert sum(len(r.token_ids) for r in again) == 5
