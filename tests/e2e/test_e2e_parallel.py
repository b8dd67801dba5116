"""Tensor- and pipeline-parallel engines served on CPU (gloo between the ranks), each rank a
`pagedserve worker` process driven by one scheduler: the greedy tokens of the whole model,
for concurrent prompts prefilled in chunks, sharing a cached prefix and preempted from a
pool too small for all of them; a seeded sampled request draws the same tokens at every
size; and a rank killed mid-generation ends every request in flight with an error naming
it, and leaves the engine NOT_SERVING."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import transformers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from services.launcher import free_port, loopback_service_commands, running_services
from tests.support.service_stack import Stack, service_stack
from tests.support.small_tokenizer import build_tokenizer, write_model_dir
from tests.support.tiny_llama import PARALLEL_DIMS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_TOKENS = 16
BLOCK_SIZE = 16
# Small enough that the prompts below prefill in chunks and preempt each other.
POOL_ARGS = ["--num-kv-blocks", "8", "--max-num-batched-tokens", "32"]
SEEDED = common_pb2.SamplingParams(
    temperature=0.9, top_p=0.95, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True
)


def _prompts(vocab_size: int) -> list[list[int]]:
    """Eight prompts: three share a two-block prefix, five stand alone."""
    rng = random.Random(0)
    shared = [rng.randrange(3, vocab_size) for _ in range(2 * BLOCK_SIZE)]
    alone = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in (21, 45, 9, 38, 17)]
    return [shared + [7, 8, 9], shared + [10, 11], shared + [12], *alone]


def _generate(
    stack: Stack, prompt: list[int], sampling: common_pb2.SamplingParams | None = None
) -> list[int]:
    if sampling is None:
        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    request = generation_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)
    return [t for response in stack.generation.Generate(request, timeout=300) for t in response.token_ids]


def _serve_prompts(
    model_dir: Path, log_dir: Path, prompts: list[list[int]], serve_flags: list[str]
) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens of every prompt (the first alone, so that the others find its prefix
    cached, then the rest at once) and a seeded sampled continuation of the first."""
    with service_stack(model_dir, log_dir, scheduler_args=POOL_ARGS, serve_flags=serve_flags) as stack:
        first = _generate(stack, prompts[0])
        with ThreadPoolExecutor(len(prompts) - 1) as pool:
            rest = list(pool.map(lambda prompt: _generate(stack, prompt), prompts[1:]))
        seeded = _generate(stack, prompts[0], SEEDED)
        stats = stack.scheduler.GetStats(scheduler_pb2.GetStatsRequest())
    assert stats.prefix_cache_hits >= 2 * BLOCK_SIZE, serve_flags
    assert stats.num_preemptions_recompute + stats.num_preemptions_swap > 0, serve_flags
    return [first, *rest], seeded


@pytest.fixture(scope="module")
def random_llama_dir(tmp_path_factory) -> Path:
    """8 query heads and 4 KV heads, 4 layers: splits 2 ways by heads and by stages."""
    model_dir = write_model_dir(tmp_path_factory.mktemp("random_llama"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{**PARALLEL_DIMS, "vocab_size": build_tokenizer().get_vocab_size()},
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def random_llama_single(random_llama_dir: Path, tmp_path_factory) -> tuple[list[list[int]], list[int]]:
    prompts = _prompts(build_tokenizer().get_vocab_size())
    return _serve_prompts(random_llama_dir, tmp_path_factory.mktemp("single"), prompts, [])


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_random_llama_splits_serve_the_single_workers_tokens(
    random_llama_dir: Path, random_llama_single, tmp_path: Path, tp: int, pp: int
) -> None:
    prompts = _prompts(build_tokenizer().get_vocab_size())
    flags = ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]
    assert _serve_prompts(random_llama_dir, tmp_path, prompts, flags) == random_llama_single


def test_embedded_model_splits_serve_the_single_workers_tokens(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    """9 query heads and 3 KV heads over 3 ranks; 30 layers over 2 stages."""
    prompts = _prompts(1000)
    single = _serve_prompts(embedded_model_dir, tmp_path / "single", prompts, [])
    for flags in (["--tensor-parallel-size", "3"], ["--pipeline-parallel-size", "2"]):
        assert _serve_prompts(embedded_model_dir, tmp_path / flags[1], prompts, flags) == single, flags


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


def test_a_killed_rank_ends_every_request_with_an_error_naming_it(
    random_llama_dir: Path, tmp_path: Path
) -> None:
    flags = ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"]
    long = common_pb2.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    prompts = _prompts(build_tokenizer().get_vocab_size())[3:]
    with service_stack(random_llama_dir, tmp_path, serve_flags=flags) as stack:
        errors: list[tuple[grpc.RpcError, float]] = []
        started = threading.Barrier(len(prompts) + 1)

        def generate(prompt: list[int]) -> None:
            request = generation_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=long)
            responses = stack.generation.Generate(request, timeout=120)
            try:
                next(responses)
                started.wait()
                for _ in responses:
                    pass
            except grpc.RpcError as error:
                errors.append((error, time.monotonic()))

        with ThreadPoolExecutor(len(prompts)) as pool:
            for prompt in prompts:
                pool.submit(generate, prompt)
            # Mid-generation: every request has its first tokens and wants 199 more.
            started.wait(timeout=120)
            stack.processes["worker2"].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        assert len(errors) == len(prompts), "every request in flight ends with an error"
        for error, at in errors:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert "rank 2" in error.details(), error.details()
            assert at - killed_at < 10.0
        assert _health(stack.scheduler_address) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_the_scheduler_refuses_workers_out_of_rank_order(random_llama_dir: Path, tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("worker", "scheduler", "tokenizer")}
    flags = ["--device", "cpu", "--tensor-parallel-size", "2"]
    commands = loopback_service_commands(random_llama_dir, ports, flags)
    scheduler = commands.pop("scheduler")
    first = scheduler.index("--worker")
    second = scheduler.index("--worker", first + 1)
    scheduler[first + 1], scheduler[second + 1] = scheduler[second + 1], scheduler[first + 1]
    del commands["tokenizer"]
    addresses = {name: f"127.0.0.1:{ports[name]}" for name in commands}
    with running_services(commands, addresses, tmp_path):
        refused = subprocess.run(scheduler, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "is rank 1, but it is address number 0" in refused.stderr, refused.stderr[-2000:]
