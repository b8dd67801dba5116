"""Requests this frontend is taking in: read, being validated and tokenized, not yet sent
to an engine. Each scheduler session reports whether the frontend keeps up (scheduler.proto's
FrontendLoad), and a request waiting here means it does not: the scheduler then holds the
frontend to its stream-message budget, so that streaming does not starve the intake."""

from collections.abc import Iterator
from contextlib import contextmanager


class Intake:
    def __init__(self) -> None:
        self.pending = 0

    @contextmanager
    def taking_in(self) -> Iterator[None]:
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1
