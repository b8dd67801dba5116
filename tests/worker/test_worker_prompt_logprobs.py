"""Prompt logprobs on the worker (CPU, a tiny random Llama, driven by the real scheduler):
equal to HF transformers' log-softmax of the same weights when the prompt is prefilled in
chunks, when steps overlap and when sequences are preempted in the middle of their prompt,
and sent once per request."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from pagedserve.v1 import common_pb2
from transformers import LlamaConfig, LlamaForCausalLM

from services.scheduler.request import Request
from tests.support.engine_loop import run_engine
from tests.support.tiny_llama import EOS_TOKEN_ID, TINY_DIMS, VOCAB_SIZE

NUM_TOP = 3


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_DIMS)).eval()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    return directory, model


def _requests() -> list[tuple[str, list[int], common_pb2.SamplingParams]]:
    rng = random.Random(5)
    requests = []
    for i in range(6):
        prompt = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(2, 40))]
        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        if i != 3:
            sampling.prompt_logprobs = NUM_TOP
        if i == 1:
            sampling.n = 2
        requests.append((f"r{i}", prompt, sampling))
    # The same prompt again: its cached prefix is not used for its logprobs.
    requests.append(("again", requests[0][1], requests[0][2]))
    return requests


@pytest.mark.hf
def test_prompt_logprobs_equal_hf_through_chunks_overlap_and_preemption(tiny_llama) -> None:
    model_dir, hf_model = tiny_llama
    requests = _requests()
    for engine in (
        {"max_num_batched_tokens": 8},
        {"steps_in_flight": 2, "max_num_batched_tokens": 16},
        {"steps_in_flight": 2, "num_kv_blocks": 12, "preemption_mode": "recompute"},
        {"steps_in_flight": 2, "num_kv_blocks": 12, "preemption_mode": "swap"},
    ):
        received = run_engine(model_dir, requests, EOS_TOKEN_ID, **engine).prompt_logprobs
        assert set(received) == {r for r, _, s in requests if s.HasField("prompt_logprobs")}, engine
        for request_id, prompt, _ in requests:
            if request_id not in received:
                continue
            with torch.no_grad():
                reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, :-1], dim=-1)
            entries = received[request_id]
            assert len(entries) == len(prompt) - 1, (engine, request_id)
            expected = reference.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
            assert [e.logprob for e in entries] == pytest.approx(expected.tolist(), abs=1e-4)
            top = reference.topk(NUM_TOP, dim=-1)
            assert [list(e.top_token_ids) for e in entries] == top.indices.tolist()
            for entry, values in zip(entries, top.values.tolist()):
                assert list(entry.top_logprobs) == pytest.approx(values, abs=1e-4)


def test_a_prompt_computed_again_adds_only_the_positions_not_received() -> None:
    from pagedserve.v1 import worker_pb2

    sampling = common_pb2.SamplingParams(prompt_logprobs=0)
    request = Request.new("r", [5, 6, 7, 8, 9], sampling, 0, 0, seed_if_unset=1)

    def received(first: int, values: list[float]) -> worker_pb2.PromptLogprobs:
        entries = [common_pb2.TokenLogprobs(logprob=v) for v in values]
        return worker_pb2.PromptLogprobs(seq_id=1, first_position=first, logprobs=entries)

    request.receive_prompt_logprobs(received(1, [-1.0, -2.0]))
    # Preempted, computed again from the start, in other chunks.
    request.receive_prompt_logprobs(received(1, [-1.5]))
    request.receive_prompt_logprobs(received(2, [-2.5, -3.0]))
    request.receive_prompt_logprobs(received(4, [-4.0]))
    assert [e.logprob for e in request.take_prompt_logprobs()] == [-1.0, -2.0, -3.0, -4.0]
    # Sent once: later ones are dropped.
    request.receive_prompt_logprobs(received(1, [-9.0]))
    assert request.prompt_logprobs is None
