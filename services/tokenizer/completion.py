"""Turns the scheduler's stream of token ids for one request into the client's stream of
text deltas: per completion, incremental detokenization, stop strings, finish reason and
usage."""

from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

from services.common.errors import UnavailableError
from services.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class Completion:
    request_id: str
    num_prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    # Which of the request's n completions this is.
    index: int = 0
    num_completion_tokens: int = 0
    finished: bool = field(default=False, init=False)

    def on_tokens(self, response: scheduler_pb2.SubmitResponse) -> generation_pb2.GenerateResponse:
        """The client's message for one scheduler message. After a stop string the
        completion is finished even if the scheduler is not: the caller stops forwarding."""
        self.num_completion_tokens += len(response.token_ids)
        text = self.detokenizer.add(response.token_ids)
        finish_reason = response.finish_reason
        if not self.detokenizer.stopped and finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            text += self.detokenizer.flush()
        if self.detokenizer.stopped:
            # A stop string, possibly found only in the text held back until now.
            finish_reason = common_pb2.FINISH_REASON_STOP
        message = generation_pb2.GenerateResponse(
            request_id=self.request_id,
            text=text,
            token_ids=response.token_ids,
            finish_reason=finish_reason,
            index=self.index,
            logprobs=response.logprobs,
            prompt_logprobs=response.prompt_logprobs,
        )
        if finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finished = True
            message.usage.prompt_tokens = self.num_prompt_tokens
            message.usage.completion_tokens = self.num_completion_tokens
            # The scheduler reports it on every message, so a stop string found here still
            # knows it. After a move to another engine, the tokens generated before it are
            # part of that engine's prompt, but not of the client's.
            message.usage.cached_tokens = min(response.usage.cached_tokens, self.num_prompt_tokens)
        return message


class Completions:
    """The n completions of one request, fed from its one scheduler stream."""

    def __init__(
        self,
        request_id: str,
        num_prompt_tokens: int,
        n: int,
        new_detokenizer: Callable[[], IncrementalDetokenizer],
    ) -> None:
        self._completions = [
            Completion(request_id, num_prompt_tokens, new_detokenizer(), index) for index in range(n)
        ]
        # Completions whose last scheduler message has come (a stop string may end one
        # here before that).
        self._num_ended_by_scheduler = 0

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self._completions)

    @property
    def ended_by_scheduler(self) -> bool:
        """The scheduler has finished every completion: nothing is left to abort."""
        return self._num_ended_by_scheduler == len(self._completions)

    def on_tokens(self, response: scheduler_pb2.SubmitResponse) -> generation_pb2.GenerateResponse | None:
        """The client's message, or None for tokens of a completion a stop string already
        ended (the scheduler keeps generating it until its own stop condition)."""
        if not 0 <= response.index < len(self._completions):
            raise UnavailableError(
                f"the scheduler sent completion {response.index} of {len(self._completions)}"
            )
        completion = self._completions[response.index]
        if response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self._num_ended_by_scheduler += 1
        return None if completion.finished else completion.on_tokens(response)
