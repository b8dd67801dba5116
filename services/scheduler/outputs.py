"""What the scheduler hands out: the step for the worker, and per-request token deltas."""

from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, scheduler_pb2, worker_pb2

from services.scheduler.request import Request


@dataclass(frozen=True)
class NewSequenceData:
    """A sequence the worker has not seen under this seq_id. Copies the tokens, which the
    request keeps appending to after the step is built."""

    seq_id: int
    token_ids: tuple[int, ...]
    num_computed_tokens: int
    sampling: common_pb2.SamplingParams

    def to_proto(self) -> worker_pb2.NewSequence:
        return worker_pb2.NewSequence(
            seq_id=self.seq_id,
            token_ids=self.token_ids,
            num_computed_tokens=self.num_computed_tokens,
            sampling=self.sampling,
        )


@dataclass(frozen=True)
class ScheduledSequenceData:
    request: Request
    seq_id: int
    num_new_tokens: int
    new_block_ids: tuple[int, ...]
    # The computation reaches the end of the known tokens, so the worker samples one.
    samples_token: bool

    def to_proto(self) -> worker_pb2.ScheduledSequence:
        return worker_pb2.ScheduledSequence(
            seq_id=self.seq_id,
            num_new_tokens=self.num_new_tokens,
            new_block_ids=self.new_block_ids,
        )


@dataclass
class SchedulerOutput:
    step_id: int
    new_sequences: list[NewSequenceData] = field(default_factory=list)
    scheduled: list[ScheduledSequenceData] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def sampling_seq_ids(self) -> list[int]:
        """The seq_ids the worker's StepResult must carry, in batch order."""
        return [s.seq_id for s in self.scheduled if s.samples_token]

    def to_proto(self) -> worker_pb2.StepRequest:
        return worker_pb2.StepRequest(
            step_id=self.step_id,
            new_sequences=[n.to_proto() for n in self.new_sequences],
            scheduled=[s.to_proto() for s in self.scheduled],
            finished_seq_ids=self.finished_seq_ids,
        )


@dataclass
class RequestOutput:
    request_id: str
    # Tokens sampled since the previous output of this request (never re-sent after a
    # preemption).
    new_token_ids: list[int]
    # common_pb2.FINISH_REASON_*; FINISH_REASON_UNSPECIFIED while the request runs.
    finish_reason: int
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED

    def to_proto(self) -> scheduler_pb2.SubmitResponse:
        response = scheduler_pb2.SubmitResponse(token_ids=self.new_token_ids)
        if self.finished:
            response.finish_reason = self.finish_reason
            response.usage.prompt_tokens = self.num_prompt_tokens
            response.usage.completion_tokens = self.num_output_tokens
        return response

    @classmethod
    def of(cls, request: Request, new_token_ids: list[int]) -> "RequestOutput":
        return cls(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
        )
