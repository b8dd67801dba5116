"""Turns the scheduler's stream of token ids for one request into the client's stream of
text deltas: incremental detokenization, stop strings, finish reason and usage."""

from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2
from services.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class Completion:
    request_id: str
    num_prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    num_completion_tokens: int = 0
    finished: bool = field(default=False, init=False)

    def on_tokens(self, response: scheduler_pb2.SubmitResponse) -> generation_pb2.GenerateResponse:
        """The client's message for one scheduler message. After a stop string the
        completion is finished even if the scheduler is not: the caller aborts it."""
        self.num_completion_tokens += len(response.token_ids)
        text = self.detokenizer.add(response.token_ids)
        finish_reason = response.finish_reason
        if not self.detokenizer.stopped and finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            text += self.detokenizer.flush()
        if self.detokenizer.stopped:
            # A stop string, possibly found only in the text held back until now.
            finish_reason = common_pb2.FINISH_REASON_STOP
        message = generation_pb2.GenerateResponse(
            request_id=self.request_id, text=text, token_ids=response.token_ids, finish_reason=finish_reason
        )
        if finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finished = True
            message.usage.prompt_tokens = self.num_prompt_tokens
            message.usage.completion_tokens = self.num_completion_tokens
        return message
