"""A request as the scheduler sees it: its tokens, how many have KV, and its blocks."""

import enum
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # queued, holds no blocks (new, or preempted)
    RUNNING = enum.auto()  # holds blocks and is known to the worker under seq_id
    FINISHED = enum.auto()


@dataclass(eq=False)
class Request:
    request_id: str
    # Prompt followed by every generated token, kept across preemptions.
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: common_pb2.SamplingParams
    # Order of arrival; both queues are kept sorted by it.
    arrival_index: int
    # Leading tokens whose KV is in block_table's blocks.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # The worker's handle; a fresh one each time the request is (re)introduced to it.
    seq_id: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED

    def __post_init__(self) -> None:
        self._stop_token_ids = frozenset(self.sampling.stop_token_ids)
        self._max_tokens = self.sampling.max_tokens if self.sampling.HasField("max_tokens") else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens_to_compute(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def stop_reason(self, eos_token_ids: frozenset[int], max_model_len: int) -> int:
        """Why the request must stop after its last token, or FINISH_REASON_UNSPECIFIED."""
        # A stop token wins over a length limit reached by the same token: the model did end.
        last_token = self.token_ids[-1]
        if last_token in self._stop_token_ids:
            return common_pb2.FINISH_REASON_STOP
        if not self.sampling.ignore_eos and last_token in eos_token_ids:
            return common_pb2.FINISH_REASON_STOP
        if self._max_tokens is not None and self.num_output_tokens >= self._max_tokens:
            return common_pb2.FINISH_REASON_LENGTH
        if self.num_tokens >= max_model_len:
            return common_pb2.FINISH_REASON_LENGTH
        return common_pb2.FINISH_REASON_UNSPECIFIED
