"""Which CUDA graphs a worker captures, and the order a step tries them in."""

from __future__ import annotations

import torch
from torch import nn

from gpu_worker.config import WorkerConfig
from gpu_worker.cuda_graphs import DecodeGraphs
from gpu_worker.parallel.groups import ParallelContext
from gpu_worker.prefill_graphs import PrefillGraphs, prefill_capture_sizes

StepGraphs = DecodeGraphs | PrefillGraphs


def graphs_prefill(config: WorkerConfig, parallel: ParallelContext) -> bool:
    """Whether steps with prompt tokens replay graphs: when asked, on CUDA, on a single
    pipeline stage (a later stage's input is the previous stage's output, which only the
    decode graphs take)."""
    single_stage = parallel.is_first_stage and parallel.is_last_stage
    wanted = config.prefill_graphs and not config.enforce_eager
    return wanted and config.resolve_device().type == "cuda" and single_stage


def prefill_graph_activation_share(config: WorkerConfig, parallel: ParallelContext) -> float:
    """The prefill graphs' activations as a share of the largest eager step's: their pool
    holds those of their largest size, beside what a step they cannot take needs."""
    if not graphs_prefill(config, parallel):
        return 0.0
    return prefill_capture_sizes(config.max_num_batched_tokens)[-1] / config.max_num_batched_tokens


def capture_step_graphs(
    model: nn.Module,
    config: WorkerConfig,
    parallel: ParallelContext,
    max_model_len: int,
    hidden_size: int,
    dtype: torch.dtype,
) -> list[StepGraphs]:
    """On CUDA unless eager: decode steps' graphs (gpu_worker/cuda_graphs.py),
    verification steps' when the worker speculates on one stage, and those of steps with
    prompt tokens (gpu_worker/prefill_graphs.py); a step takes the first that can run it."""
    device = config.resolve_device()
    if device.type != "cuda" or config.enforce_eager:
        return []
    intermediate = None
    if not parallel.is_first_stage:
        intermediate = torch.zeros(config.max_num_seqs, hidden_size, dtype=dtype, device=device)
    shape = (model, config.max_num_seqs, max_model_len, config.block_size, device)
    graphs: list[StepGraphs] = [DecodeGraphs(*shape, intermediate)]
    lookahead = config.speculative.max_lookahead
    if lookahead and parallel.is_first_stage and parallel.is_last_stage:
        graphs.append(DecodeGraphs(*shape, query_len=1 + lookahead))
    if graphs_prefill(config, parallel):
        graphs.append(
            PrefillGraphs(
                model,
                config.max_num_seqs,
                config.max_num_batched_tokens,
                max_model_len,
                config.block_size,
                device,
            )
        )
    # Largest activations first, so that the smaller graphs reuse their memory.
    pool = None
    for step_graphs in sorted(graphs, key=lambda g: isinstance(g, PrefillGraphs), reverse=True):
        pool = step_graphs.capture(pool)
    return graphs
