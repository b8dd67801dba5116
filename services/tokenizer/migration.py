"""A request that moves to another engine when its engine fails mid-stream: the new engine
gets the prompt plus every token already streamed, marked as generated so that penalties
count them, with max_tokens and min_tokens reduced by them, and the same seed (a draw is
a function of the seed and the position), so generation continues where it stopped and
the client's stream neither repeats nor skips a token."""

from dataclasses import dataclass

from pagedserve.v1 import scheduler_pb2

from services.common.errors import RemoteError, UnavailableError
from services.tokenizer.routing import NoEngineError

UNAVAILABLE_CODE = 14


@dataclass(frozen=True)
class MigrationConfig:
    # Engine failures one request survives; past them it fails with UNAVAILABLE.
    max_migrations: int = 3
    # Seconds a request that left a failed engine waits for one to serve (the same one,
    # restarted, if it is the only one) before it fails with UNAVAILABLE.
    engine_wait_s: float = 60.0


class EngineStoppedServing(UnavailableError):
    """The engine a request is on stopped serving (its workers failed) while its scheduler
    still holds the request for recomputation: the request moves if another engine serves,
    and otherwise waits there."""


def is_engine_failure(error: Exception) -> bool:
    """The engine failed (its stream broke, or it answered UNAVAILABLE), not the request:
    worth trying elsewhere."""
    if isinstance(error, RemoteError):
        return error.code == UNAVAILABLE_CODE
    return isinstance(error, UnavailableError) and not isinstance(error, NoEngineError)


class ResumableRequest:
    """One request's submit for the engine it goes to next, given what came back so far."""

    def __init__(self, submit: scheduler_pb2.SubmitRequest, config: MigrationConfig) -> None:
        self._submit = submit
        self._config = config
        self._n = submit.sampling.n if submit.sampling.HasField("n") else 1
        # Tokens streamed to the client so far (of a request with one completion).
        self.generated: list[int] = []
        self.num_migrations = 0

    def submit_request(self) -> scheduler_pb2.SubmitRequest:
        """The request as the next engine takes it."""
        if not self.generated:
            return self._submit
        resumed = scheduler_pb2.SubmitRequest()
        resumed.CopyFrom(self._submit)
        resumed.prompt_token_ids.extend(self.generated)
        resumed.num_resumed_tokens = len(self.generated)
        sampling = resumed.sampling
        sampling.max_tokens -= len(self.generated)
        if sampling.min_tokens:
            sampling.min_tokens = max(0, sampling.min_tokens - len(self.generated))
        return resumed

    def on_output(self, output: scheduler_pb2.SubmitResponse) -> None:
        self.generated.extend(output.token_ids)

    def migrate(self, error: Exception) -> None:
        """Counts a move away from a failed engine; raises UnavailableError when the
        request may not move again."""
        if self._n > 1 and self.generated:
            raise UnavailableError(
                f"{error}; a request with n={self._n} completions cannot move to another engine mid-stream"
            )
        if self.num_migrations >= self._config.max_migrations:
            raise UnavailableError(
                f"{error}; the request already moved to another engine {self.num_migrations} times, "
                f"the limit (max_migrations)"
            )
        if self._submit.sampling.max_tokens - len(self.generated) <= 0:
            raise UnavailableError(f"{error}; after all of its tokens were generated")
        self.num_migrations += 1
