"""The waiting, running and swapped queues, each kept in scheduling order
(Sequence.sort_key): priority, then arrival, then completion index. A preempted sequence
arrived before any newcomer of its priority, so it resumes first."""

import bisect

from services.scheduler.request import Sequence, SequenceStatus


def _sort_key(sequence: Sequence) -> tuple[int, int, int]:
    return sequence.sort_key


def num_requests(queue: list[Sequence]) -> int:
    return len({s.request.request_id for s in queue})


class SequenceQueues:
    def __init__(self) -> None:
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []

    def of(self, sequence: Sequence) -> list[Sequence]:
        """The queue a sequence's status puts it in."""
        return {
            SequenceStatus.WAITING: self.waiting,
            SequenceStatus.RUNNING: self.running,
            SequenceStatus.SWAPPED: self.swapped,
        }[sequence.status]

    def insert(self, sequence: Sequence, status: SequenceStatus) -> None:
        sequence.status = status
        bisect.insort(self.of(sequence), sequence, key=_sort_key)

    def remove(self, sequence: Sequence) -> None:
        self.of(sequence).remove(sequence)
