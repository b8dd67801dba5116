"""Overlapped steps on the worker (CPU, a tiny random Llama): the scheduler plans step N+1
while N runs, the runner launches N+1 before N is finished and feeds N's tokens in; every
completion gets the tokens it gets one step at a time. And the worker's step pipeline
launches a step that arrives while the previous one still runs."""

from __future__ import annotations

import asyncio
import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from pagedserve.v1 import common_pb2, worker_pb2
from transformers import LlamaConfig, LlamaForCausalLM

from gpu_worker.step_pipeline import MAX_STEPS_LAUNCHED, pipelined_steps
from tests.support.engine_loop import EngineRequest, run_engine
from tests.support.tiny_llama import EOS_TOKEN_ID, TINY_DIMS, VOCAB_SIZE

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_DIMS)
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).eval().save_pretrained(model_dir)
    return model_dir


def _requests() -> list[EngineRequest]:
    rng = random.Random(7)
    requests = []
    for i in range(8):
        prompt = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(2, 30))]
        sampling = common_pb2.SamplingParams(max_tokens=rng.randrange(4, 16), seed=100 + i)
        sampling.temperature = 0.0 if i % 2 else 1.0
        if i % 3 == 0:
            sampling.n = 2
        # Frequent stop tokens: stops found one step late.
        sampling.stop_token_ids.extend(rng.sample(range(3, VOCAB_SIZE), 40))
        requests.append((f"r{i}", prompt, sampling))
    return requests


def _run(
    model_dir: Path,
    requests: list[EngineRequest],
    steps_in_flight: int,
    num_kv_blocks: int,
    preemption_mode: str = "recompute",
) -> dict[tuple[str, int], tuple[list[int], int]]:
    run = run_engine(
        model_dir,
        requests,
        EOS_TOKEN_ID,
        steps_in_flight=steps_in_flight,
        num_kv_blocks=num_kv_blocks,
        preemption_mode=preemption_mode,
        block_size=BLOCK_SIZE,
    )
    assert run.all_blocks_freed
    return {key: (tokens, run.finish_reasons[key]) for key, tokens in run.tokens.items()}


def test_overlapped_steps_give_each_completion_its_tokens(tiny_llama: Path) -> None:
    requests = _requests()
    alone = {}
    for request in requests:
        alone.update(_run(tiny_llama, [request], steps_in_flight=1, num_kv_blocks=64))
    assert any(len(tokens) < 4 for tokens, _ in alone.values())  # some stop early
    for steps_in_flight in (2, 3):
        assert _run(tiny_llama, requests, steps_in_flight, num_kv_blocks=64) == alone
    # A pool too small for all at once: preemption while steps are in flight.
    for mode in ("recompute", "swap"):
        assert _run(tiny_llama, requests, 2, num_kv_blocks=16, preemption_mode=mode) == alone, mode
    assert _run(tiny_llama, requests, 3, num_kv_blocks=16, preemption_mode="swap") == alone
    assert _run(tiny_llama, requests, 1, num_kv_blocks=16) == alone


# --- the worker's step pipeline ---------------------------------------------------------


@dataclass
class _FakeLaunched:
    step_id: int
    device_done: threading.Event = field(default_factory=threading.Event)
    replayed_graph: bool = False

    def wait(self) -> None:
        assert self.device_done.wait(timeout=10)


class _FakeRunner:
    def __init__(self) -> None:
        # What the model thread ran, in order; results read on the device-wait thread.
        self.events: list[tuple[str, int]] = []
        self.read: list[int] = []
        self.launched: dict[int, _FakeLaunched] = {}

    def launch_step(self, step: worker_pb2.StepRequest) -> _FakeLaunched:
        self.events.append(("launch", step.step_id))
        self.launched[step.step_id] = _FakeLaunched(step.step_id)
        return self.launched[step.step_id]

    def read_result(self, launched: _FakeLaunched) -> worker_pb2.StepResult:
        self.read.append(launched.step_id)
        return worker_pb2.StepResult(step_id=launched.step_id)

    def finish_step(self, launched: _FakeLaunched) -> worker_pb2.StepResult:
        self.events.append(("finish", launched.step_id))
        return worker_pb2.StepResult(step_id=launched.step_id)


def test_a_step_that_arrives_while_one_runs_is_launched_before_that_one_finishes() -> None:
    from concurrent.futures import ThreadPoolExecutor

    async def scenario() -> None:
        runner = _FakeRunner()
        arriving: asyncio.Queue = asyncio.Queue()
        scopes: list[str] = []

        class Scope:
            def __init__(self, step_id: int) -> None:
                self.step_id = step_id

            def __enter__(self) -> None:
                scopes.append(f"open {self.step_id}")

            def __exit__(self, *exc) -> None:
                scopes.append(f"close {self.step_id}")

        async def steps():
            while (step := await arriving.get()) is not None:
                yield step

        async def until(condition) -> None:
            for _ in range(1000):
                if condition():
                    return
                await asyncio.sleep(0.001)
            raise AssertionError("not reached")

        results = pipelined_steps(
            runner, steps(), ThreadPoolExecutor(1), around_step=lambda s: Scope(s.step_id)
        )
        received: list[int] = []

        async def consume() -> None:
            async for result in results:
                received.append(result.step_id)

        consumer = asyncio.ensure_future(consume())
        limit = MAX_STEPS_LAUNCHED
        for step_id in range(1, limit + 1):
            await arriving.put(worker_pb2.StepRequest(step_id=step_id))
            await until(lambda step_id=step_id: step_id in runner.launched)
        # One more waits: `limit` steps are launched and none is done.
        await arriving.put(worker_pb2.StepRequest(step_id=limit + 1))
        await asyncio.sleep(0.05)
        assert limit + 1 not in runner.launched and received == []
        runner.launched[1].device_done.set()
        await until(lambda: received == [1] and limit + 1 in runner.launched)
        for step_id in range(2, limit + 2):
            runner.launched[step_id].device_done.set()
        await arriving.put(None)
        await asyncio.wait_for(consumer, timeout=10)
        steps = range(1, limit + 2)
        assert received == list(steps) and runner.read == list(steps)
        await until(lambda: len(runner.events) == 2 * len(steps))
        launches = [("launch", i) for i in steps]
        assert runner.events == [*launches[:limit], ("finish", 1), launches[limit]] + [
            ("finish", i) for i in steps[1:]
        ]
        opens = [f"open {i}" for i in steps]
        assert scopes == [*opens[:limit], "close 1", opens[limit]] + [f"close {i}" for i in steps[1:]]

    asyncio.run(scenario())


def test_a_step_that_fails_to_launch_ends_the_stream_after_the_steps_before_it() -> None:
    from concurrent.futures import ThreadPoolExecutor

    class FailingRunner(_FakeRunner):
        def launch_step(self, step: worker_pb2.StepRequest) -> _FakeLaunched:
            if step.step_id == 2:
                raise ValueError("step 2: bad block table")
            launched = super().launch_step(step)
            launched.device_done.set()
            return launched

    async def scenario() -> tuple[list[int], list[str]]:
        closed: list[str] = []

        @contextmanager
        def scope(step: worker_pb2.StepRequest):
            yield
            closed.append(f"close {step.step_id}")

        async def steps():
            for step_id in (1, 2, 3):
                yield worker_pb2.StepRequest(step_id=step_id)

        received: list[int] = []
        with pytest.raises(ValueError, match="step 2"):
            async for result in pipelined_steps(
                FailingRunner(), steps(), ThreadPoolExecutor(1), around_step=scope
            ):
                received.append(result.step_id)
        return received, closed

    received, closed = asyncio.run(scenario())
    assert received == [1]
    # Every step's scope closes, the failed one's and any launched after it too.
    assert closed[:2] == ["close 1", "close 2"] and len(closed) == len(set(closed)) <= 3


def test_a_result_leaves_while_the_next_step_is_being_launched() -> None:
    """The model thread launching step 2 does not hold back step 1's result; step 1's
    draws reach its sequences (finish_step) on the model thread after that launch."""
    from concurrent.futures import ThreadPoolExecutor

    launching = threading.Event()
    release_launch = threading.Event()

    class SlowLaunchRunner(_FakeRunner):
        def launch_step(self, step: worker_pb2.StepRequest) -> _FakeLaunched:
            if step.step_id == 2:
                launching.set()
                assert release_launch.wait(timeout=10)
            launched = super().launch_step(step)
            if step.step_id == 2:
                launched.device_done.set()
            return launched

    async def scenario() -> SlowLaunchRunner:
        runner = SlowLaunchRunner()

        async def steps():
            for step_id in (1, 2):
                yield worker_pb2.StepRequest(step_id=step_id)

        results = pipelined_steps(runner, steps(), ThreadPoolExecutor(1))
        first_result = asyncio.ensure_future(anext(results))
        # The device finishes step 1 while the model thread is launching step 2.
        assert await asyncio.to_thread(launching.wait, 10)
        runner.launched[1].device_done.set()
        first = await asyncio.wait_for(first_result, timeout=10)
        assert first.step_id == 1 and launching.is_set() and not release_launch.is_set()
        assert runner.events == [("launch", 1)]
        release_launch.set()
        assert [result.step_id async for result in results] == [2]
        return runner

    runner = asyncio.run(scenario())
    assert runner.events == [("launch", 1), ("launch", 2), ("finish", 1), ("finish", 2)]


def test_a_step_whose_draws_fail_to_reach_their_sequences_fails_the_next_launch() -> None:
    from concurrent.futures import ThreadPoolExecutor

    class FailingFinishRunner(_FakeRunner):
        def launch_step(self, step: worker_pb2.StepRequest) -> _FakeLaunched:
            launched = super().launch_step(step)
            launched.device_done.set()
            return launched

        def finish_step(self, launched: _FakeLaunched) -> worker_pb2.StepResult:
            if launched.step_id == 1:
                raise RuntimeError("step 1: sequence state lost")
            return super().finish_step(launched)

    async def scenario() -> list[int]:
        arriving: asyncio.Queue = asyncio.Queue()

        async def steps():
            while (step := await arriving.get()) is not None:
                yield step

        received: list[int] = []
        await arriving.put(worker_pb2.StepRequest(step_id=1))
        with pytest.raises(RuntimeError, match="step 1"):
            async for result in pipelined_steps(FailingFinishRunner(), steps(), ThreadPoolExecutor(1)):
                received.append(result.step_id)
                # Step 2 arrives once step 1's result has left (and its finish failed).
                await arriving.put(worker_pb2.StepRequest(step_id=2))
                await arriving.put(None)
        return received

    assert asyncio.run(scenario()) == [1]
