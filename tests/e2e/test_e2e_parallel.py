"""Tensor- and pipeline-parallel engines served on CPU (gloo between the ranks), each rank a
`pagedserve worker` process driven by one scheduler: the greedy tokens of the whole model,
for concurrent prompts prefilled in chunks, sharing a cached prefix and preempted from a
pool too small for all of them; a seeded sampled request draws the same tokens at every
size; and under `pagedserve serve` a rank killed mid-generation restarts its whole group,
and every request in flight completes with the tokens of an undisturbed run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import transformers
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2

from services.launcher import free_port, is_serving, loopback_service_commands, running_services
from tests.support.serve_process import running_serve, wait_for
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


def _greedy_tokens(address: str, prompt: list[int], started: threading.Barrier | None = None) -> list[int]:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=RECOVERY_MAX_TOKENS, ignore_eos=True)
    request = generation_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)
    tokens: list[int] = []
    with grpc.insecure_channel(address) as channel:
        for response in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=300):
            if started is not None and not tokens and response.token_ids:
                started.wait(timeout=120)
            tokens.extend(response.token_ids)
    return tokens


RECOVERY_MAX_TOKENS = 40


def test_a_killed_rank_restarts_its_group_and_every_request_completes(
    random_llama_dir: Path, tmp_path: Path
) -> None:
    """Under `pagedserve serve`, a rank killed mid-generation: serve restarts every rank of
    the group, the scheduler recomputes the requests it held, and each completes with the
    tokens of an undisturbed run."""
    # A killed rank is seen at once (its stream ends); a long timeout keeps slow but live
    # ranks on a busy machine from being declared dead too.
    flags = ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--worker-timeout", "15"]
    prompts = _prompts(build_tokenizer().get_vocab_size())[3:]
    with running_serve(random_llama_dir, tmp_path / "serve.log", flags) as served:
        address = served.public_address
        with ThreadPoolExecutor(len(prompts)) as pool:
            undisturbed = list(pool.map(lambda prompt: _greedy_tokens(address, prompt), prompts))
        ranks = [served.pid_of("worker", rank) for rank in range(4)]
        scheduler_address = served.address_of("scheduler")
        started = threading.Barrier(len(prompts) + 1)
        with ThreadPoolExecutor(len(prompts)) as pool:
            streams = [pool.submit(_greedy_tokens, address, prompt, started) for prompt in prompts]
            started.wait(timeout=120)
            os.kill(ranks[2], signal.SIGKILL)
            # Until the group serves again, the engine says it cannot.
            wait_for(lambda: not is_serving(scheduler_address), 10, "NOT_SERVING once a rank died")
            disturbed = [stream.result() for stream in streams]
        assert disturbed == undisturbed
        assert is_serving(scheduler_address)
        restarted = [served.pid_of("worker", rank) for rank in range(4)]
        assert not set(restarted) & set(ranks), "the whole group started again"
        # One restart of the group, counted for whichever rank serve found gone first (the
        # others leave the group as soon as their step streams end).
        names = ["worker", "worker1", "worker2", "worker3"]
        assert sum(served.restarts(name, "exit") for name in names) == 1
        assert "workers failed: worker rank 2" in served.log_path.read_text()


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
