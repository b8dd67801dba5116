"""Greedy generation through the worker's ModelRunner (the real step protocol, no
scheduler) and through a Hugging Face model, for token-exact comparisons."""

from __future__ import annotations

import torch
from pagedserve.v1 import common_pb2, worker_pb2

from gpu_worker.model_runner import ModelRunner


def runner_greedy(runner: ModelRunner, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """All prompts in one batch; each sequence gets enough blocks up front."""
    block_size = runner.config.block_size
    step = worker_pb2.StepRequest(step_id=1)
    next_block = 0
    for seq_id, prompt in enumerate(prompts):
        num_blocks = -(-(len(prompt) + max_new_tokens) // block_size)
        blocks = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        step.new_sequences.add(
            seq_id=seq_id, token_ids=prompt, sampling=common_pb2.SamplingParams(temperature=0)
        )
        step.scheduled.add(seq_id=seq_id, num_new_tokens=len(prompt), new_block_ids=blocks)
    generated: list[list[int]] = [[] for _ in prompts]
    for step_id in range(1, max_new_tokens + 1):
        if step_id > 1:
            step = worker_pb2.StepRequest(step_id=step_id)
            for seq_id in range(len(prompts)):
                step.scheduled.add(seq_id=seq_id, num_new_tokens=1)
        result = runner.execute_step(step)
        for seq_id, token_id in zip(result.seq_ids, result.token_ids):
            generated[seq_id].append(token_id)
    return generated


def hf_greedy(hf_model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            output = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
            outputs.append(output[0, len(prompt) :].tolist())
    return outputs
