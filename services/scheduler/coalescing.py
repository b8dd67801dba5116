"""How many stream messages each engine step sends: each one costs the process that
streams it to the client tens of microseconds of gRPC work whatever it carries, so with
hundreds of streams a message per token per step would take longer than the step itself.

A completion's tokens wait here, merged, until its turn: `max_messages_per_step` messages
per step leave for each group of streams, the completions waiting longest first. A group
is the streams one frontend (tokenizer process) carries, since that process pays for the
messages: more tokenizer processes may take more messages per step. A first token (time
to first token) and a completion's last message always leave at once. With fewer streams
than the budget, every token leaves with the step that sampled it.

What a step leaves unused is saved, up to SAVED_STEPS steps' worth, for steps with more
streams than the budget: the number of streams wanders around its mean under steady load,
and a step a little over the budget would otherwise hold a token back a step (a gap of
twice the step time in that stream). Under a load that keeps the frontend busy every
step uses its whole budget, nothing is saved, and the budget holds as before.

A frontend that says it keeps up (scheduler.proto's FrontendLoad: nothing waiting to be
taken in or streamed on) gets every held token at once where that is at most
KEEPING_UP_FACTOR times the budget: the budget protects a busy frontend's intake, and one
with time to spare only delays tokens by holding them. Beyond that many streams tokens
must wait anyway, and more messages would only cost the frontend and the scheduler time
(full batches were slower so), so there the budget holds.
"""

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from services.scheduler.outputs import RequestOutput

_Key = tuple[str, int]
# The group of a request's stream, by request_id.
GroupOf = Callable[[str], Hashable]


# How many steps' unused budget a group may save for later steps.
SAVED_STEPS = 7
# Up to how many times its budget a group sends everything at once while its frontend
# keeps up.
KEEPING_UP_FACTOR = 2


@dataclass(eq=False)
class Frontend:
    """The group of the streams one frontend process carries, and whether it last said
    that it keeps up; until it says so it is taken to be behind."""

    keeps_up: bool = False


def _one_group(request_id: str) -> Hashable:
    return None


class OutputCoalescer:
    def __init__(self, max_messages_per_step: int | None, group_of: GroupOf = _one_group) -> None:
        """max_messages_per_step: per group; None, no limit."""
        self.max_messages_per_step = max_messages_per_step
        self._group_of = group_of
        # Each group's held outputs, the one held longest first.
        self._held: dict[Hashable, OrderedDict[_Key, RequestOutput]] = {}
        # Each group's budget saved from earlier steps.
        self._saved: dict[Hashable, int] = {}

    def add(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Takes a step's outputs (or an abort's); returns those that leave at once, in
        order: first tokens and last messages, merged with what their completion held."""
        return self._add(outputs)[0]

    def _add(self, outputs: list[RequestOutput]) -> tuple[list[RequestOutput], Counter[Hashable]]:
        """add(outputs), and how many of those leaving belong to each group."""
        leaving = []
        sent: Counter[Hashable] = Counter()
        for output in outputs:
            key = (output.request_id, output.index)
            group = self._group_of(output.request_id)
            held_of_group = self._held.get(group)
            held = held_of_group.get(key) if held_of_group is not None else None
            if held is not None:
                output = output.absorb_earlier(held)
            first_tokens = output.num_output_tokens == len(output.new_token_ids) and output.new_token_ids
            if self.max_messages_per_step is None or output.finished or first_tokens:
                if held_of_group is not None and held is not None:
                    del held_of_group[key]
                    if not held_of_group:
                        del self._held[group]
                leaving.append(output)
                sent[group] += 1
                continue
            if held_of_group is None:
                held_of_group = self._held[group] = OrderedDict()
            # A completion already waiting keeps its place in line.
            held_of_group[key] = output
        return leaving, sent

    def take_due(self, sent: Counter[Hashable] | None = None) -> list[RequestOutput]:
        """Held outputs whose turn it is this step, `sent` messages having left already in
        each group; what the step leaves of a group's budget is saved."""
        budget = self.max_messages_per_step
        if budget is None:
            return []
        sent = sent or Counter()
        saved = self._saved
        due: list[RequestOutput] = []
        for group, held in list(self._held.items()):
            if _clears_at_once(group, budget, len(held) + sent[group]):
                count = len(held)
            else:
                count = max(0, min(len(held), budget + saved.get(group, 0) - sent[group]))
            due.extend(held.popitem(last=False)[1] for _ in range(count))
            if not held:
                del self._held[group]
            sent[group] += count
        for group in saved.keys() | sent.keys():
            saved[group] = min(budget * SAVED_STEPS, max(0, budget + saved.get(group, 0) - sent[group]))
        return due

    def pace(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """One step's messages: add(outputs), then the held ones whose turn it is."""
        leaving, sent = self._add(outputs)
        return leaving + self.take_due(sent)

    def clear(self) -> None:
        self._held.clear()
        self._saved.clear()

    def flush(self) -> list[RequestOutput]:
        """Every held output, at once (their requests' steps are over for now)."""
        held = [output for group in self._held.values() for output in group.values()]
        self._held.clear()
        return held

    def __len__(self) -> int:
        return sum(len(held) for held in self._held.values())


def _clears_at_once(group: Hashable, budget: int, messages: int) -> bool:
    """Whether a group whose step would send `messages` with nothing held sends them all."""
    return isinstance(group, Frontend) and group.keeps_up and messages <= budget * KEEPING_UP_FACTOR
