"""LLM: the scheduler driving a model runner in this process, no gRPC between them, for
batch jobs. Requests take the public API's path otherwise: the tokenizer service's
validation, chat templates, incremental detokenizing and stop strings, the scheduler's
batching and the worker's sampler, so that a seed gives what the server gives."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from services.common.proto_fields import set_prompt
from services.offline.sampling import SamplingParams
from services.scheduler.config import SchedulerConfig
from services.scheduler.server import build_scheduler
from services.tokenizer.completion import Completions
from services.tokenizer.frontend import FrontendConfig, PreparedRequest, RequestFrontend
from services.tokenizer.http.responses import finish_reason_name
from services.tokenizer.tokenizer import TextTokenizer

# A conversation: {"role": ..., "content": ...} per turn.
Conversation = Sequence[dict[str, str]]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # "stop" or "length".
    finish_reason: str | None = None
    # With SamplingParams.logprobs: per generated token, token id → log-probability for
    # the sampled token and the top ones.
    logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # Prompt tokens whose KV came from the prefix cache.
    num_cached_tokens: int = 0


class LLM:
    """`LLM(model=DIR)`; with no model, the embedded SmolLM2-135M-Instruct. Keyword
    arguments are WorkerConfig's fields (device, dtype, num_kv_blocks, ...)."""

    def __init__(
        self, model: str | Path | None = None, scheduler: SchedulerConfig | None = None, **worker: Any
    ) -> None:
        from gpu_worker.config import WorkerConfig
        from gpu_worker.model_runner import ModelRunner

        if model is None:
            from services.common.embedded_model import materialize_default_model

            model = materialize_default_model()
        self._runner = ModelRunner(WorkerConfig(model_path=Path(model), **worker))
        self._info = self._runner.info()
        self._scheduler_config = scheduler or SchedulerConfig()
        tokenizer = TextTokenizer.from_model_dir(Path(model))
        probe = build_scheduler(self._scheduler_config, self._info)
        self._frontend = RequestFrontend(
            tokenizer,
            FrontendConfig(max_model_len=probe.max_model_len, vocab_size=self._info.model.vocab_size),
        )
        self._next_id = 0

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt (text, or token ids), in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        requests = []
        for prompt in prompts:
            request = generation_pb2.GenerateRequest(
                sampling=(sampling_params or SamplingParams()).to_proto()
            )
            set_prompt(request, prompt)
            requests.append(request)
        return self._run(requests)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """One output per conversation, rendered with the model's chat template."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [cast(Conversation, messages)] if single else cast(list[Conversation], list(messages))
        sampling = (sampling_params or SamplingParams()).to_proto()
        requests = [
            generation_pb2.GenerateRequest(
                messages=[
                    generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in conversation
                ],
                sampling=sampling,
            )
            for conversation in conversations
        ]
        return self._run(requests)

    def _run(self, requests: list[generation_pb2.GenerateRequest]) -> list[RequestOutput]:
        scheduler = build_scheduler(self._scheduler_config, self._info)
        runs: dict[str, _Run] = {}
        for request in requests:
            request.request_id = f"offline-{self._next_id}"
            self._next_id += 1
            prepared = self._frontend.prepare_generate(request)
            scheduler.add_request(prepared.request_id, prepared.prompt_token_ids, prepared.sampling)
            runs[prepared.request_id] = _Run(prepared, self._frontend.new_completions(prepared))
        in_flight: deque[Any] = deque()
        while scheduler.has_unfinished_requests() or in_flight:
            while (
                len(in_flight) < scheduler.max_steps_in_flight and (step := scheduler.schedule()) is not None
            ):
                in_flight.append((step, self._runner.launch_step(step.to_proto())))
            if not in_flight:
                raise RuntimeError("the scheduler has unfinished requests but nothing to schedule")
            step, launched = in_flight.popleft()
            for output in scheduler.update_from_output(step, self._runner.finish_step(launched)):
                if runs[output.request_id].add(output.to_proto()):
                    # Stop strings ended every completion before the scheduler did.
                    scheduler.abort_request(output.request_id)
        self._runner.reset()
        return [runs[request.request_id].result() for request in requests]


class _Run:
    """One request's completions as they come back."""

    def __init__(self, prepared: PreparedRequest, completions: Completions) -> None:
        self._prepared = prepared
        self._completions = completions
        n = prepared.sampling.n if prepared.sampling.HasField("n") else 1
        self._outputs = [CompletionOutput(index) for index in range(n)]
        self._cached_tokens = 0

    def add(self, response: scheduler_pb2.SubmitResponse) -> bool:
        """Takes one scheduler output; True once stop strings finished every completion
        while the scheduler still runs some."""
        message = self._completions.on_tokens(response)
        if message is not None:
            output = self._outputs[message.index]
            output.text += message.text
            output.token_ids.extend(message.token_ids)
            for token_id, entry in zip(message.token_ids, message.logprobs):
                top = dict(zip(entry.top_token_ids, entry.top_logprobs))
                output.logprobs.append({token_id: entry.logprob, **top})
            if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                output.finish_reason = finish_reason_name(message.finish_reason)
                self._cached_tokens = message.usage.cached_tokens
        return self._completions.finished and not self._completions.ended_by_scheduler

    def result(self) -> RequestOutput:
        return RequestOutput(
            self._prepared.request_id,
            list(self._prepared.prompt_token_ids),
            self._outputs,
            self._cached_tokens,
        )
