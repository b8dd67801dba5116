"""Greedy generation through the worker's ModelRunner (the real step protocol, no
scheduler) and through a Hugging Face model, for token-exact comparisons."""

from __future__ import annotations

import torch
from pagedserve.v1 import common_pb2, worker_pb2

from gpu_worker.model_runner import ModelRunner


def runner_greedy(
    runner: ModelRunner,
    prompts: list[list[int]],
    max_new_tokens: int,
    block_ids: list[list[int]] | None = None,
) -> list[list[int]]:
    """All prompts in one batch; each sequence gets enough blocks up front: block_ids[i]
    for sequence i if given, else consecutive ones."""
    if block_ids is None:
        block_ids = _consecutive_blocks(runner.config.block_size, prompts, max_new_tokens)
    step = worker_pb2.StepRequest(step_id=1)
    for seq_id, (prompt, blocks) in enumerate(zip(prompts, block_ids, strict=True)):
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


def _consecutive_blocks(block_size: int, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    block_ids = []
    next_block = 0
    for prompt in prompts:
        num_blocks = -(-(len(prompt) + max_new_tokens) // block_size)
        block_ids.append(list(range(next_block, next_block + num_blocks)))
        next_block += num_blocks
    return block_ids


def hf_greedy(hf_model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            output = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
            outputs.append(output[0, len(prompt) :].tolist())
    return outputs
