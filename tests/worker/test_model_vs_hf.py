"""The engine's architectures against Hugging Face transformers with the same weights (CPU,
fp32), one tiny random checkpoint per architecture (tests/support/tiny_architectures.py).

The batched tests drive ModelRunner.execute_step with a small scripted scheduler: prompts
join at different steps, a token budget splits prefills into chunks that share steps with
decodes, block ids come shuffled from a pool that reuses freed blocks, and one sequence is
preempted and recomputed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from pagedserve.v1 import common_pb2, worker_pb2

from gpu_worker.config import WorkerConfig
from gpu_worker.model.attention import AttentionMetadata, attention_context
from gpu_worker.model_runner import ModelRunner
from tests.support.greedy_runs import hf_greedy, runner_greedy
from tests.support.tiny_architectures import BUILDERS, build_tiny_model
from tests.support.tiny_llama import TINY_DIMS, VOCAB_SIZE

# Every architecture and format against its reference: the full suite's, not the quick round's.
pytestmark = pytest.mark.slow

BLOCK_SIZE = 4
NUM_KV_BLOCKS = 48


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny_model(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    hf_model = build_tiny_model(request.param)
    model_dir = tmp_path_factory.mktemp(f"tiny_{request.param}")
    hf_model.save_pretrained(model_dir)
    # Greedy references run to their full length.
    hf_model.generation_config.eos_token_id = None
    return hf_model, model_dir


def _make_runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(
        WorkerConfig(model_path=model_dir, device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS)
    )


def _hf_logits(hf_model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0]


@pytest.mark.hf
def test_info_describes_model(tiny_model) -> None:
    hf_model, model_dir = tiny_model
    info = _make_runner(model_dir).info()
    assert info.model.model_name == model_dir.name
    assert info.model.architecture == hf_model.config.model_type
    assert info.model.max_model_len == 256
    assert info.model.vocab_size == VOCAB_SIZE
    assert list(info.model.eos_token_ids) == [2]
    assert (info.num_kv_blocks, info.block_size) == (NUM_KV_BLOCKS, BLOCK_SIZE)
    assert (info.device, info.dtype) == ("cpu", "float32")


@pytest.mark.hf
def test_prompt_logits_match_hf(tiny_model) -> None:
    hf_model, model_dir = tiny_model
    runner = _make_runner(model_dir)
    token_ids = torch.randint(0, VOCAB_SIZE, (29,), generator=torch.Generator().manual_seed(1))
    num_tokens = len(token_ids)
    # Every position's logits, from one prefill over scattered blocks.
    blocks = [11, 3, 40, 7, 0, 25, 19, 8]
    slots = [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(num_tokens)]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        block_tables=torch.tensor([blocks], dtype=torch.int32),
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
    )
    with torch.inference_mode(), attention_context(metadata):
        logits = runner.model.compute_logits(runner.model(token_ids, torch.arange(num_tokens)))
    torch.testing.assert_close(logits, _hf_logits(hf_model, token_ids.tolist()), atol=2e-5, rtol=1e-5)


@dataclass
class _ScriptedSequence:
    seq_id: int
    token_ids: list[int]
    max_new_tokens: int
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_generated: int = 0
    registered: bool = False


class _ScriptedScheduler:
    """Just enough of a scheduler to exercise the worker protocol: a token budget per step,
    running sequences first, blocks from a shuffled pool, finished blocks back to the pool."""

    def __init__(self, token_budget: int, seed: int) -> None:
        self.token_budget = token_budget
        self.free_blocks = list(range(NUM_KV_BLOCKS))
        random.Random(seed).shuffle(self.free_blocks)
        self.running: list[_ScriptedSequence] = []
        self.pending_finished: list[int] = []
        self.step_id = 0
        self.saw_partial_prefill = False
        self.saw_mixed_step = False

    def add(self, seq: _ScriptedSequence) -> None:
        self.running.append(seq)

    def preempt(self, seq: _ScriptedSequence) -> None:
        """Drops the sequence's KV; it comes back as a new sequence that recomputes."""
        self.pending_finished.append(seq.seq_id)
        self.free_blocks.extend(seq.block_ids)
        seq.block_ids, seq.num_computed_tokens, seq.registered = [], 0, False

    def next_step(self) -> worker_pb2.StepRequest:
        """Builds the next step; `sampling_seq_ids` names the sequences that will sample."""
        self.step_id += 1
        step = worker_pb2.StepRequest(step_id=self.step_id, finished_seq_ids=self.pending_finished)
        self.pending_finished = []
        budget = self.token_budget
        num_prefill = num_decode = 0
        self.sampling_seq_ids: list[int] = []
        for seq in self.running:
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if num_new == 0:
                continue
            if not seq.registered:
                step.new_sequences.add(
                    seq_id=seq.seq_id,
                    token_ids=seq.token_ids,
                    num_computed_tokens=seq.num_computed_tokens,
                    sampling=common_pb2.SamplingParams(temperature=0.0),
                )
                seq.registered = True
            end = seq.num_computed_tokens + num_new
            blocks_needed = -(-end // BLOCK_SIZE) - len(seq.block_ids)
            new_blocks = [self.free_blocks.pop() for _ in range(blocks_needed)]
            seq.block_ids.extend(new_blocks)
            step.scheduled.add(seq_id=seq.seq_id, num_new_tokens=num_new, new_block_ids=new_blocks)
            self.saw_partial_prefill |= end < len(seq.token_ids)
            if num_new == 1 and seq.num_generated > 0:
                num_decode += 1
            else:
                num_prefill += 1
            seq.num_computed_tokens = end
            if end == len(seq.token_ids):
                self.sampling_seq_ids.append(seq.seq_id)
            budget -= num_new
        self.saw_mixed_step |= num_prefill > 0 and num_decode > 0
        return step

    def apply(self, result: worker_pb2.StepResult) -> None:
        assert result.step_id == self.step_id
        by_id = {seq.seq_id: seq for seq in self.running}
        for seq_id, token_id in zip(result.seq_ids, result.token_ids):
            seq = by_id[seq_id]
            seq.token_ids.append(token_id)
            seq.num_generated += 1
            if seq.num_generated == seq.max_new_tokens:
                self.running.remove(seq)
                self.pending_finished.append(seq_id)
                self.free_blocks.extend(seq.block_ids)


@pytest.mark.hf
def test_batched_greedy_matches_hf(tiny_model) -> None:
    hf_model, model_dir = tiny_model
    runner = _make_runner(model_dir)
    prompt_rng = random.Random(2)
    prompt_lengths = [3, 26, 9, 17, 1]
    join_at_step = [1, 1, 2, 4, 6]
    max_new_tokens = 7
    prompts = [[prompt_rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in prompt_lengths]
    sequences = [
        _ScriptedSequence(seq_id=100 + i, token_ids=list(p), max_new_tokens=max_new_tokens)
        for i, p in enumerate(prompts)
    ]
    scheduler = _ScriptedScheduler(token_budget=10, seed=3)
    sampled_logits: dict[int, list[tuple[list[int], torch.Tensor]]] = {s.seq_id: [] for s in sequences}

    # Record what the sampler sees, to compare each sampled row with HF's logits.
    sample = runner.sampler.sample_on_device
    by_id = {seq.seq_id: seq for seq in sequences}

    def recording_sample(logits, params, positions):
        for seq_id, row in zip(scheduler.sampling_seq_ids, logits):
            sampled_logits[seq_id].append((list(by_id[seq_id].token_ids), row.clone()))
        return sample(logits, params, positions)

    runner.sampler.sample_on_device = recording_sample
    preempted = False
    long_seq = sequences[1]
    for step_index in range(1, 60):
        for seq, join in zip(sequences, join_at_step):
            if join == step_index:
                scheduler.add(seq)
        # Preempt the long prompt once it has generated a few tokens: it must recompute
        # its prompt and generated tokens and continue as if nothing happened.
        if not preempted and long_seq.num_generated == 3:
            scheduler.preempt(long_seq)
            preempted = True
        if not scheduler.running and not scheduler.pending_finished:
            break
        result = runner.execute_step(scheduler.next_step())
        assert list(result.seq_ids) == scheduler.sampling_seq_ids
        scheduler.apply(result)

    assert preempted and scheduler.saw_partial_prefill and scheduler.saw_mixed_step
    assert not scheduler.running
    for seq, prompt in zip(sequences, prompts):
        assert seq.token_ids[len(prompt) :] == hf_greedy(hf_model, [prompt], max_new_tokens)[0], seq.seq_id
        assert sampled_logits[seq.seq_id]
        for context, row in sampled_logits[seq.seq_id]:
            torch.testing.assert_close(row, _hf_logits(hf_model, context)[-1], atol=2e-5, rtol=1e-5)
    # Finished sequences were forgotten by the worker.
    assert runner.sequences == {}


@pytest.mark.hf
def test_prefix_cache_hit_starts_from_shared_blocks(tiny_model) -> None:
    """A new sequence whose first blocks hold another's KV computes only its own suffix."""
    hf_model, model_dir = tiny_model
    runner = _make_runner(model_dir)
    greedy = common_pb2.SamplingParams(temperature=0.0)
    shared_prefix = list(range(40, 48))  # two full blocks
    first = shared_prefix + [5, 6, 7]
    second = shared_prefix + [9, 10]
    step = worker_pb2.StepRequest(step_id=1)
    step.new_sequences.add(seq_id=1, token_ids=first, sampling=greedy)
    step.scheduled.add(seq_id=1, num_new_tokens=len(first), new_block_ids=[30, 12, 5])
    runner.execute_step(step)

    step = worker_pb2.StepRequest(step_id=2, finished_seq_ids=[1])
    step.new_sequences.add(seq_id=2, token_ids=second, num_computed_tokens=8, sampling=greedy)
    step.scheduled.add(seq_id=2, num_new_tokens=2, new_block_ids=[30, 12, 44])
    result = runner.execute_step(step)
    assert list(result.token_ids) == hf_greedy(hf_model, [second], 1)[0]


@pytest.mark.hf
@pytest.mark.slow
def test_real_model_greedy_matches_hf(request) -> None:
    """The embedded SmolLM2 model, when the session provides it."""
    try:
        model_dir = request.getfixturevalue("embedded_model_dir")
    except pytest.FixtureLookupError:
        pytest.skip("no embedded_model_dir fixture")
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None
    runner = ModelRunner(WorkerConfig(model_path=model_dir, device="cpu", block_size=16, num_kv_blocks=4))
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33]]
    max_new_tokens = 6
    # Two blocks each cover prompt and completion; interleaved ids.
    block_ids = [[2, 0], [3, 1]]
    generated = runner_greedy(runner, prompts, max_new_tokens, block_ids)
    assert generated == hf_greedy(hf_model, prompts, max_new_tokens)


def test_eos_ids_merge_generation_config(tmp_path) -> None:
    from gpu_worker.model.config import ModelConfig

    raw = dict(TINY_DIMS, model_type="llama", architectures=["LlamaForCausalLM"], eos_token_id=2)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    config = ModelConfig.from_model_dir(tmp_path)
    assert config.eos_token_ids == (2, 7)
    assert config.architecture == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="ntk"):
        ModelConfig.from_dicts(dict(raw, rope_scaling={"rope_type": "ntk", "factor": 2.0}))


@pytest.mark.hf
def test_dynamic_ntk_decodes_past_the_trained_context_as_hf(tmp_path: Path) -> None:
    """Dynamic NTK scaling stretches a 16-position model to 32: prompts inside the
    trained context, greedy decoding well past it, token for token as HF, which raises
    the rotary base as each decoded token lengthens the sequence."""
    import transformers

    torch.manual_seed(0)
    dims = dict(TINY_DIMS, max_position_embeddings=16)
    config = transformers.LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **dims)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path)
    hf_model.generation_config.eos_token_id = None
    runner = ModelRunner(
        WorkerConfig(
            model_path=tmp_path, device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=24, max_model_len=32
        )
    )
    assert runner.max_model_len == 32
    prompts = [[5, 17, 99, 3, 42, 8, 11], [200, 7, 64, 31, 9, 150, 77, 12, 4, 90, 33, 21, 6]]
    max_new_tokens = 18
    assert all(len(prompt) + max_new_tokens > 16 for prompt in prompts)
    assert runner_greedy(runner, prompts, max_new_tokens) == hf_greedy(hf_model, prompts, max_new_tokens)
