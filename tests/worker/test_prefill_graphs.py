"""Prefill graphs (gpu_worker/prefill_graphs.py). The batch layout (gpu_worker/prefill_graphs.py): a step's tokens at
the front of the graph's rows, padding rows with slot -1 after them, and empty sequences
up to the graph's sequence count. Attention over that layout must give every real token
what the packed batch gives it and store exactly the packed batch's keys and values.
CUDA graphs cannot run here, so the buffers are staged on the CPU and attention is the
PyTorch reference that the Triton kernel is tested against on the same layout
(tests/kernels/cache_layout_cases.py). And the runner with them: every completion gets
the tokens that eager steps give it, the replay of a graph emulated by running the
captured forward on the graph's buffers (what the captured kernels read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pagedserve.v1 import common_pb2
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from gpu_worker.config import WorkerConfig
from gpu_worker.kernels.paged_attention import PADDING_SLOT, paged_attention, store_kv
from gpu_worker.model.attention import attention_context
from gpu_worker.model_runner import ModelRunner
from gpu_worker.parallel.groups import ParallelContext
from gpu_worker.prefill_graphs import PrefillGraphs, prefill_capture_sizes, prefill_seq_slots
from gpu_worker.step_graphs import prefill_graph_activation_share
from tests.support.engine_loop import run_engine
from tests.support.tiny_llama import EOS_TOKEN_ID, TINY_DIMS
from tests.worker.test_overlapped_steps import _requests
from tests.worker.test_verification_graph_layout import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    SCALE,
    PackedStep,
    _packed_batch,
)


def test_capture_sizes_double_up_to_the_step_budget_or_the_largest_graph() -> None:
    assert prefill_capture_sizes(8192) == [128, 256, 512, 1024, 2048]
    assert prefill_capture_sizes(1500) == [128, 256, 512, 1024, 1500]
    assert prefill_capture_sizes(100) == [100]


def test_prefill_graphs_are_asked_for_and_reserve_their_activations() -> None:
    def config(**fields: Any) -> WorkerConfig:
        return WorkerConfig(model_path=Path("model"), **fields)

    def share(worker: WorkerConfig) -> float:
        return prefill_graph_activation_share(worker, ParallelContext(config=worker.parallel))

    # 2,048 of the 8,192 tokens an eager step may take.
    assert share(config(device="cuda", prefill_graphs=True)) == 0.25
    assert share(config(device="cuda", prefill_graphs=True, max_num_batched_tokens=1024)) == 1.0
    assert share(config(device="cuda")) == 0.25
    assert share(config(device="cuda", prefill_graphs=False)) == 0.0
    assert share(config(device="cuda", prefill_graphs=True, enforce_eager=True)) == 0.0
    assert share(config(device="cpu", prefill_graphs=True)) == 0.0


@pytest.mark.parametrize(
    ("cached", "query_lens"),
    [([7, 2, 0, 11], [5, 1, 3, 2]), ([0], [40]), ([9, 1, 30], [1, 1, 20])],
)
def test_staged_batch_attends_as_the_packed_batch(cached: list[int], query_lens: list[int]) -> None:
    torch.manual_seed(1)
    metadata, positions = _packed_batch(cached, query_lens)
    num_tokens = positions.shape[0]
    step = PackedStep.random(metadata)

    # A budget of 300 tokens: graphs of 128, 256 and 300 tokens, for up to 6 sequences.
    graphs = PrefillGraphs(nn.Identity(), 6, 300, NUM_BLOCKS * BLOCK_SIZE, BLOCK_SIZE, torch.device("cpu"))
    graphs.seq_slots = [2, 4, 6]
    # Rows of an earlier, larger step that the staging must overwrite or mark as padding.
    graphs.stage(torch.arange(290), torch.arange(290), _packed_batch([0, 0], [150, 140])[0])
    staged = graphs.stage(torch.randint(0, 1000, (num_tokens,)), positions, metadata)
    size = staged.max_query_len
    assert size == 128 and staged.slot_mapping.shape[0] == size
    assert torch.equal(graphs.positions[:num_tokens], positions)
    assert (staged.slot_mapping[num_tokens:] == PADDING_SLOT).all()
    num_seqs = len(cached)
    # The fewest slots that hold the batch.
    assert staged.seq_lens.shape[0] == {1: 2, 3: 4, 4: 4}[num_seqs]
    assert (staged.seq_lens[num_seqs:] == 0).all()
    assert (staged.query_start_loc[num_seqs:] == num_tokens).all()

    # Padding rows carry garbage queries, keys and values: none of it may reach a real row.
    padded = [torch.randn(size, *t.shape[1:]) for t in (step.query, step.key, step.value)]
    for buffer, real in zip(padded, (step.query, step.key, step.value)):
        buffer[:num_tokens] = real
    staged_keys, staged_values = step.key_cache.clone(), step.value_cache.clone()
    store_kv(padded[1], padded[2], staged_keys, staged_values, staged.slot_mapping)
    output = paged_attention(
        padded[0],
        staged_keys,
        staged_values,
        staged.block_tables,
        staged.query_start_loc,
        staged.seq_lens,
        SCALE,
    )
    assert torch.equal(staged_keys, step.packed_keys) and torch.equal(staged_values, step.packed_values)
    torch.testing.assert_close(output[:num_tokens], step.expected)


class _EagerReplay:
    """Stands in for a captured graph, which cannot run here: the forward on the graph's
    buffers, its output written where the graph's output lives."""

    def __init__(self, graphs: PrefillGraphs, size: int, slots: int) -> None:
        self.graphs, self.size, self.slots = graphs, size, slots
        self.replays = 0

    def replay(self) -> None:
        graphs, size = self.graphs, self.size
        with attention_context(graphs._metadata(size, self.slots)):
            output = graphs.model(graphs.input_ids[:size], graphs.positions[:size], None)
        graphs.outputs[size, self.slots] = output
        self.replays += 1


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny_llama_prefill_graphs")
    LlamaForCausalLM(LlamaConfig(**TINY_DIMS)).eval().save_pretrained(model_dir)
    return model_dir


def test_runner_with_prefill_graphs_gives_the_eager_tokens(tiny_llama: Path) -> None:
    replays: list[_EagerReplay] = []
    # Whether each launched step says it replayed a graph (its span's mode).
    said_replayed: list[bool] = []

    def with_prefill_graphs(runner: ModelRunner) -> None:
        config = runner.config
        graphs = PrefillGraphs(runner.model, 8, 24, runner.max_model_len, config.block_size, runner.device)
        graphs.sizes = [8, 16, 24]  # several sizes under the 24-token budget
        graphs.seq_slots = [2, 4, 8]
        for size in graphs.sizes:
            for slots in graphs.seq_slots:
                replay = _EagerReplay(graphs, size, slots)
                graphs.graphs[size, slots] = replay  # type: ignore[assignment]
                replays.append(replay)
        runner.step_graphs = [graphs]
        launch_step = runner.launch_step

        def launch_and_note(step: Any) -> Any:
            launched = launch_step(step)
            said_replayed.append(launched.replayed_graph)
            return launched

        runner.launch_step = launch_and_note  # type: ignore[method-assign]

    short = ("short", [5, 6, 7, 8, 9], common_pb2.SamplingParams(max_tokens=6))
    requests = [*_requests(), short]
    # All at once (full steps, overlapped or not), and each alone (steps of its prompt).
    scenarios = [(requests, 1), (requests, 2)] + [([request], 2) for request in requests]
    for batch, steps_in_flight in scenarios:
        runs = [
            run_engine(tiny_llama, batch, EOS_TOKEN_ID, steps_in_flight, prepare_runner=prepare)
            for prepare in (None, with_prefill_graphs)
        ]
        assert all(run.all_blocks_freed for run in runs)
        assert runs[1].tokens == runs[0].tokens and runs[1].finish_reasons == runs[0].finish_reasons
    replays_by_size = {size: sum(r.replays for r in replays if r.size == size) for size in (8, 16, 24)}
    assert all(replays_by_size.values()), replays_by_size
    replays_by_slots = {slots: sum(r.replays for r in replays if r.slots == slots) for slots in (2, 4, 8)}
    assert all(replays_by_slots.values()), replays_by_slots
    # Decode steps run eagerly here (no decode graphs on CPU): only the replays say so.
    assert sum(said_replayed) == sum(replays_by_size.values()) < len(said_replayed)


def test_a_graph_splits_decode_contexts_for_the_fewest_sequences_it_serves() -> None:
    graphs = PrefillGraphs(nn.Identity(), 256, 512, NUM_BLOCKS * BLOCK_SIZE, BLOCK_SIZE, torch.device("cpu"))
    assert [graphs._metadata(256, slots).fewest_seqs for slots in graphs.seq_slots] == [1, 16, 64]


def test_sequence_slots_grow_fourfold_up_to_max_num_seqs() -> None:
    assert prefill_seq_slots(256) == [16, 64, 256]
    assert prefill_seq_slots(512) == [16, 64, 256, 512]
    assert prefill_seq_slots(100) == [16, 64, 100]
    assert prefill_seq_slots(8) == [8]
