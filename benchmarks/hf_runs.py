"""HF transformers on the benchmark workload, in the same process and on the same device:
its own continuous batching (paged attention), and plain generate() on static batches."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.device import Stopwatch, release_memory, timed
from benchmarks.pagedserve_runs import RunResult
from benchmarks.workload import Workload


def load_hf_model(model_dir: Path, device: str, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation
    )
    # transformers wraps PreTrainedModel.to in a decorator that mypy reads as unbound.
    return model.to(device).eval()  # type: ignore[arg-type]


def run_hf_continuous_batching(
    model_dir: Path,
    workload: Workload,
    device: str,
    dtype: torch.dtype,
    attn_implementation: str = "paged|sdpa",
) -> RunResult:
    """Every request with its own max_new_tokens through the continuous-batching manager."""
    from transformers import GenerationConfig

    model = load_hf_model(model_dir, device, dtype, attn_implementation)
    generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max(workload.output_lengths), pad_token_id=0, eos_token_id=None
    )
    # Warm-up outside the timing.
    _continuous_batching(model, generation_config, Workload([[1] * 30], [4]))
    with timed(device) as watch:
        outputs = _continuous_batching(model, generation_config, workload)
    del model
    release_memory(device)
    return _result(f"HF generate_batch ({attn_implementation})", watch, outputs)


def _continuous_batching(model, generation_config, workload: Workload) -> list[list[int]]:
    manager = model.init_continuous_batching(generation_config=generation_config)
    manager.start()
    try:
        ids = []
        for i, (prompt, num_out) in enumerate(zip(workload.prompts, workload.output_lengths)):
            ids.append(manager.add_request(input_ids=prompt, request_id=f"r{i}", max_new_tokens=num_out))
        results: dict[str, list[int]] = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("HF continuous batching stopped before every request finished")
            if result.is_finished():
                results[result.request_id] = list(result.generated_tokens)
    finally:
        manager.stop(block=True)
    return [results[request_id] for request_id in ids]


def run_hf_static(
    model_dir: Path, workload: Workload, device: str, dtype: torch.dtype, batch_size: int
) -> RunResult:
    """generate() on batches of `batch_size` left-padded prompts, each batch running to its
    longest output; only each sequence's own output length counts as useful tokens."""
    model = load_hf_model(model_dir, device, dtype, "sdpa")
    _static_batch(model, [[1] * 30, [2] * 20], [4, 4], device)  # warm-up
    outputs: list[list[int]] = []
    with timed(device) as watch:
        for offset in range(0, len(workload.prompts), batch_size):
            prompts = workload.prompts[offset : offset + batch_size]
            lengths = workload.output_lengths[offset : offset + batch_size]
            outputs.extend(_static_batch(model, prompts, lengths, device))
    del model
    release_memory(device)
    return _result(f"HF generate (static batches of {batch_size})", watch, outputs)


def _result(name: str, watch: Stopwatch, outputs: list[list[int]]) -> RunResult:
    return RunResult(name, watch.seconds, sum(len(o) for o in outputs), outputs)


@torch.inference_mode()
def _static_batch(model, prompts: list[list[int]], lengths: list[int], device: str) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    num_new = max(lengths)
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=num_new,
        min_new_tokens=num_new,  # never stops at EOS, as ignore_eos
        do_sample=False,
        pad_token_id=0,
    )
    new_tokens = generated[:, width:].tolist()
    return [tokens[:n] for tokens, n in zip(new_tokens, lengths)]
