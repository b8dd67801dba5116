"""Executes scheduler steps: one forward over a mixed batch, then sampling.

The scheduler owns block allocation; the runner keeps, per live sequence, only what it
needs to build the next batch from a small step delta: its tokens, how many of them have
KV in the cache, its block table and its sampling state.

A step runs in two halves so that steps overlap: launch_step queues the step's work on the
device and returns at once; finish_step waits for its sampled tokens and reports them. The
next step may be launched in between: a sequence it computes the token of a step not yet
finished gets that token on the device (gpu_worker/input_batch.py), so the device goes from
one step to the next without waiting for the host.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from itertools import accumulate

import torch
from pagedserve.v1 import common_pb2, worker_pb2

from gpu_worker.config import WorkerConfig
from gpu_worker.input_batch import DeviceToken, StepInputBuilder, StepInputs
from gpu_worker.kernel_warmup import warm_up_mixed_decode
from gpu_worker.kv_cache import (
    KVCacheLayout,
    allocate_kv_cache,
    apply_block_ops,
    bind_kv_cache,
    determine_num_kv_blocks,
    num_cpu_blocks,
)
from gpu_worker.memory_profile import GRAPH_MARGIN_BYTES, memory_held, profile_activation_bytes
from gpu_worker.model.attention import attention_context
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.loader import load_model
from gpu_worker.model.quantization.support import with_requested_quantization
from gpu_worker.parallel.groups import init_parallel
from gpu_worker.parallel.stage_exchange import StageExchange
from gpu_worker.penalties import PenaltyTable
from gpu_worker.prompt_logprobs import PromptLogprobs, score_prompts
from gpu_worker.sampler import SampledTokens, Sampler, SequenceSampling
from gpu_worker.speculative.decoding import SpeculativeDecoding, merge_gained
from gpu_worker.speculative.gather import extend_tables
from gpu_worker.speculative.setup import build_speculation, kv_blocks_with_draft, load_draft
from gpu_worker.step_graphs import capture_step_graphs, prefill_graph_activation_share
from gpu_worker.step_observer import StepObserver
from gpu_worker.step_state import LaunchedStep, SequenceState
from gpu_worker.structured_output import GrammarMasks, unmasked_logprobs

# What one step feeds the model and the sampler (built by gpu_worker.input_batch).
_Batch = StepInputs


class ModelRunner:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.model_config = with_requested_quantization(ModelConfig.from_model_dir(config.model_path), config)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.longest_context:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"longest context {self.model_config.longest_context}"
            )
        # Joins the engine's other ranks first: under tensor parallelism loading, profiling
        # and graph capture run collectives, in the same order on every rank.
        self.parallel = init_parallel(config.parallel, self.device)
        self.model = load_model(
            config.model_path,
            self.model_config,
            self.device,
            self.dtype,
            self.max_model_len,
            self.parallel,
            load_format=config.load_format,
        )
        self.draft_model = load_draft(config, self.model_config, self.max_model_len, self.device, self.dtype)
        self.stages = StageExchange(self.parallel, self.model_config.hidden_size, self.dtype, self.device)
        # This rank's share of the cache: its stage's layers, its KV heads.
        layout = KVCacheLayout.of_model(self.model)
        kv_dtype = config.resolve_kv_cache_dtype(self.dtype)
        reserved_bytes = self._activation_reserve()
        with memory_held(reserved_bytes, self.device) if reserved_bytes else nullcontext():
            num_blocks = determine_num_kv_blocks(config, layout, self.device, kv_dtype)
            if self.draft_model is not None:
                num_blocks = kv_blocks_with_draft(
                    num_blocks, config, layout, self.draft_model, self.device, self.dtype
                )
        self.kv_cache = allocate_kv_cache(layout, num_blocks, config.block_size, self.device, kv_dtype)
        bind_kv_cache(self.model.attention_layers(), self.kv_cache)
        # Where preempted sequences' KV waits to be swapped back in.
        self.cpu_kv_cache = allocate_kv_cache(
            layout,
            num_cpu_blocks(config, layout, kv_dtype),
            config.block_size,
            self.device,
            kv_dtype,
            swap_pool=True,
        )
        self.step_graphs = capture_step_graphs(
            self.model, config, self.parallel, self.max_model_len, self.model_config.hidden_size, self.dtype
        )
        if self.device.type == "cuda":
            warm_up_mixed_decode(self.model.attention_layers(), config.max_num_seqs, self.dtype)
        self.sampler = Sampler(self.device, config.seed, self.model_config.eos_token_ids)
        self.penalties = PenaltyTable(self.model_config.vocab_size, self.device)
        self.grammars = GrammarMasks(
            config.model_path / "tokenizer.json",
            self.model_config.vocab_size,
            self.model_config.eos_token_ids,
        )
        self.observer = StepObserver(self.device, config.step_timeline_path)
        self.sequences: dict[int, SequenceState] = {}
        self.prompt_logprobs = PromptLogprobs()
        self.step_inputs = StepInputBuilder(
            -(-self.max_model_len // config.block_size),
            config.block_size,
            self.device,
            config.max_num_batched_tokens,
            config.max_num_seqs,
        )
        self.speculation: SpeculativeDecoding | None = build_speculation(
            config,
            self.draft_model,
            self.kv_cache,
            self.cpu_kv_cache,
            self.step_inputs,
            self.sampler,
            self.device,
        )

    def _activation_reserve(self) -> int:
        """The memory set aside before the KV cache takes the rest (CUDA): the largest
        step's activations, measured, and what the CUDA graphs hold."""
        if self.device.type != "cuda":
            return 0
        config = self.config
        activation_bytes = profile_activation_bytes(
            self.model, self.model_config, config, self.max_model_len, self.device, self.dtype
        )
        graph_share = prefill_graph_activation_share(config, self.parallel)
        return GRAPH_MARGIN_BYTES + int(activation_bytes * (1 + graph_share))

    def info(self) -> worker_pb2.WorkerInfo:
        model = common_pb2.ModelInfo(
            model_name=self.config.model_path.resolve().name,
            architecture=self.model_config.model_type,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=list(self.model_config.eos_token_ids),
        )
        return worker_pb2.WorkerInfo(
            model=model,
            num_kv_blocks=self.kv_cache.num_blocks,
            block_size=self.kv_cache.block_size,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            num_cpu_blocks=self.cpu_kv_cache.num_blocks,
            **self.config.step_limits().worker_info_fields(),
            rank=self.parallel.config.rank,
            tensor_parallel_size=self.parallel.config.tensor_parallel_size,
            pipeline_parallel_size=self.parallel.config.pipeline_parallel_size,
            reports_tokens=self.parallel.answers,
            num_speculative_tokens=self.config.speculative.max_lookahead,
            # A draft model may see the whole context: it needs every block kept.
            sliding_window=(self.model_config.window_of_every_layer or 0) if self.draft_model is None else 0,
        )

    def reset(self) -> None:
        """Forgets every sequence, as when a new scheduler stream starts from scratch."""
        self.sequences.clear()
        self.penalties.clear()
        self.grammars.clear()
        self.prompt_logprobs.clear()
        self.step_inputs.clear()

    def execute_step(self, step: worker_pb2.StepRequest) -> worker_pb2.StepResult:
        """One step from start to sampled tokens."""
        return self.finish_step(self.launch_step(step))

    @torch.inference_mode()
    def launch_step(self, step: worker_pb2.StepRequest) -> LaunchedStep:
        """Applies the step's changes and queues its forward and sampling on the device;
        returns without waiting for them. Steps are launched and finished in order."""
        start_ns = time.perf_counter_ns()
        self._apply_changes(step)
        launched = LaunchedStep(step.step_id, start_ns)
        if not step.scheduled:
            self.observer.on_launch(step, start_ns, None)
            return launched
        # Planned before the batch is built, which advances the sequences.
        prompt_slices = (
            self.prompt_logprobs.plan(step.scheduled, self.sequences) if self.prompt_logprobs else []
        )
        speculation = self.speculation
        if speculation is not None and any(entry.num_lookahead_tokens for entry in step.scheduled):
            extend_tables(self.step_inputs, step.scheduled)
            proposals = speculation.propose(step.scheduled, self.sequences)
            batch = self.step_inputs.build(step.scheduled, self.sequences, proposals, tables_extended=True)
        else:
            batch = self._prepare_batch(step.scheduled)
        self.observer.on_device_start()
        hidden_states, launched.replayed_graph = self._forward(batch)
        if speculation is not None:
            speculation.proposer.after_forward(batch)
        if prompt_slices:
            launched.prompt_scores = score_prompts(
                hidden_states, prompt_slices, self.model.compute_logits, self._copy_to_host
            )
        if batch.sample_seq_ids:
            self._sample(batch, hidden_states, launched)
        if speculation is not None and batch.verification is not None:
            launched.verified = speculation.verify(
                self.model, hidden_states, batch, self.sequences, self._copy_to_host
            )
            launched.sample_index = batch.sample_index
        ended = self.observer.on_launch(step, start_ns, batch)
        if launched.samples or launched.prompt_scores or launched.verified is not None:
            launched.copied, launched.device = ended, self.device
        return launched

    def _apply_changes(self, step: worker_pb2.StepRequest) -> None:
        """The scheduler's changes since the last step: sequences finished and new, and
        blocks to copy or swap."""
        for seq_id in step.finished_seq_ids:
            self.sequences.pop(seq_id, None)
            self.step_inputs.remove(seq_id)
            self.penalties.remove(seq_id)
            self.grammars.remove(seq_id)
            self.prompt_logprobs.remove(seq_id)
        for new in step.new_sequences:
            # A new sequence brings its whole block table in this step's scheduled entry.
            self.step_inputs.remove(new.seq_id)
            state = self.sequences[new.seq_id] = SequenceState(
                token_ids=list(new.token_ids),
                num_computed_tokens=new.num_computed_tokens,
                sampling=SequenceSampling.from_proto(
                    new.sampling, new.index, self.sampler.fallback_seed(new.seq_id), new.num_prompt_tokens
                ),
            )
            if state.sampling.has_penalties:
                self.penalties.add(new.seq_id, state.token_ids, new.num_prompt_tokens)
            if self.parallel.is_last_stage and new.sampling.HasField("structured_output"):
                # A caller that leaves num_prompt_tokens unset generated nothing yet.
                num_prompt_tokens = new.num_prompt_tokens or len(new.token_ids)
                self.grammars.add(new.seq_id, new.sampling, new.token_ids[num_prompt_tokens:])
            if self.parallel.is_last_stage and new.sampling.HasField("prompt_logprobs"):
                self.prompt_logprobs.add(new)
        apply_block_ops(self.kv_cache, self.cpu_kv_cache, step)
        if self.speculation is not None:
            self.speculation.proposer.apply_block_ops(step)

    def _sample(self, batch: _Batch, hidden_states: torch.Tensor, launched: LaunchedStep) -> None:
        """Queues the sampling of the batch's sampling rows and the copy of the draws to
        the host; each sequence's newest token is then its draw, still on the device.
        Pipeline stages before the last receive the last stage's draws instead."""
        sequences = self.sequences
        states = [sequences[seq_id] for seq_id in batch.sample_seq_ids]
        samplings = [s.sampling for s in states]
        if self.parallel.is_last_stage:
            # index_select: one gather, with less host work than advanced indexing.
            logits = self.model.compute_logits(hidden_states.index_select(0, batch.sample_rows))
            positions = [len(s.token_ids) + s.num_pending_tokens for s in states]
            allowed = self.grammars.masked(logits, batch.sample_seq_ids) if self.grammars else logits
            if self.penalties:
                rows = self.penalties.rows(batch.sample_seq_ids)
                sampled = self.sampler.sample_on_device(allowed, samplings, positions, self.penalties, rows)
            else:
                sampled = self.sampler.sample_on_device(allowed, samplings, positions)
            if allowed is not logits:
                sampled = unmasked_logprobs(logits, sampled)
                for seq_id, first in zip(batch.sample_seq_ids, sampled.first_indices):
                    self.grammars.note_draw(seq_id, launched, first)
        else:
            sampled = SampledTokens.to_receive(samplings, self.device)
        self.stages.share_draws(sampled.tokens)
        # A sequence that drew n tokens (its request's first sample) continues with the
        # one of its own completion index, its first draw; the scheduler forks the others.
        tokens = sampled.tokens
        for state, count, first in zip(states, sampled.counts, sampled.first_indices):
            state.num_pending_tokens += 1
            state.newest_pending_token = DeviceToken(tokens, first)
            if count > 1:
                state.sampling = state.sampling.after_sample()
        launched.samples = list(zip(batch.sample_seq_ids, states, sampled.counts))
        if sampled.logprobs is not None:
            lp = sampled.logprobs
            launched.host_logprobs = (
                self._copy_to_host(lp.sampled),
                self._copy_to_host(lp.top_ids),
                self._copy_to_host(lp.top_values),
            )
        launched.host_tokens = self._copy_to_host(tokens)

    def read_result(self, launched: LaunchedStep) -> worker_pb2.StepResult | None:
        """The result of a step whose draws are on the host (`launched.wait()` returned),
        built from what the step kept at its launch alone, so that another thread may
        build it while the model thread launches the next step; finish_step then returns
        it. None for a step that speculated: its verification is merged with the
        sequences' state, on the model thread."""
        if launched.verified is not None:
            return None
        launched.result = self._drawn_result(launched)
        return launched.result

    def finish_step(self, launched: LaunchedStep) -> worker_pb2.StepResult:
        """Waits for a launched step's tokens (the oldest launched and not finished),
        gives them to their sequences and returns the step's result."""
        launched.wait()
        self.observer.on_device_done()
        result = launched.result if launched.result is not None else self.read_result(launched)
        if launched.host_tokens is not None:
            tokens = launched.host_tokens.tolist()
            sequences = self.sequences
            for (seq_id, state, _), first in zip(launched.samples, _first_draws(launched.samples, tokens)):
                # A sequence finished or preempted since has no state left to update; the
                # scheduler still expects its tokens.
                if sequences.get(seq_id) is state:
                    state.token_ids.append(tokens[first])
                    state.num_pending_tokens -= 1
                    if not state.num_pending_tokens:
                        state.newest_pending_token = None
        if result is None:
            assert launched.verified is not None and self.speculation is not None
            gained = self.speculation.finish(launched.verified, self.sequences)
            result = self._drawn_result(launched)
            if self.parallel.answers:
                merge_gained(result, gained, launched.sample_index)
        self.observer.on_result(launched.step_id, launched.result_at_s)
        return result

    def _drawn_result(self, launched: LaunchedStep) -> worker_pb2.StepResult:
        result = worker_pb2.StepResult(step_id=launched.step_id)
        # Every rank holds the same draws; one answers for the engine.
        if self.parallel.answers:
            if launched.host_tokens is not None:
                tokens = launched.host_tokens.tolist()
                samples = launched.samples
                result.token_ids.extend(tokens)
                if len(tokens) == len(samples):
                    result.seq_ids.extend(seq_id for seq_id, _, _ in samples)
                else:
                    result.seq_ids.extend(seq_id for seq_id, _, count in samples for _ in range(count))
                if launched.host_logprobs is not None:
                    result.logprobs.extend(token_logprobs(*launched.host_logprobs))
            if launched.prompt_scores:
                result.prompt_logprobs.extend(scored.to_proto() for scored in launched.prompt_scores)
        # From the step's arrival to its tokens on the host, so a step launched behind
        # another counts the wait for it too.
        result.execute_ns = time.perf_counter_ns() - launched.start_ns
        launched.result_at_s = time.perf_counter()
        return result

    def _copy_to_host(self, tokens: torch.Tensor) -> torch.Tensor:
        """Queues the copy; the step's end event (DeviceTimer.stop) says when it is done."""
        if self.device.type != "cuda":
            return tokens
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        return host

    def _forward(self, batch: _Batch) -> tuple[torch.Tensor, bool]:
        """The batch's hidden states, and whether a captured graph computed them."""
        intermediate = self.stages.receive_activations(batch.input_ids.shape[0])
        graphs = next((g for g in self.step_graphs if g.can_run(batch.metadata)), None)
        if graphs is not None:
            output = graphs.run(batch.input_ids, batch.positions, batch.metadata, intermediate)
        else:
            with attention_context(batch.metadata):
                output = self.model(batch.input_ids, batch.positions, intermediate)
        self.stages.send_activations(output)
        return output, graphs is not None

    def _prepare_batch(self, scheduled: Sequence[worker_pb2.ScheduledSequence]) -> _Batch:
        return self.step_inputs.build(scheduled, self.sequences)


def token_logprobs(
    sampled: torch.Tensor, top_ids: torch.Tensor, top_values: torch.Tensor
) -> list[common_pb2.TokenLogprobs]:
    """One TokenLogprobs per draw, from the host copies of SampledLogprobs."""
    return [
        common_pb2.TokenLogprobs(logprob=logprob, top_token_ids=ids, top_logprobs=values)
        for logprob, ids, values in zip(sampled.tolist(), top_ids.tolist(), top_values.tolist())
    ]


def _first_draws(samples: list[tuple[int, SequenceState, int]], tokens: list[int]) -> Iterable[int]:
    """Where each sample's draws start among the step's tokens."""
    if len(tokens) == len(samples):
        # Every sequence drew one token (the usual case): token i is sample i's.
        return range(len(samples))
    return accumulate((count for _, _, count in samples[:-1]), initial=0)
