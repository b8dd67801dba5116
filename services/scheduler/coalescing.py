"""How many stream messages each engine step sends: each one costs the scheduler and the
tokenizer tens of microseconds of gRPC work whatever it carries, so with hundreds of
streams a message per token per step would take longer than the step itself.

A completion's tokens wait here, merged, until its turn: at most `max_messages_per_step`
messages leave per step, the completions waiting longest first. A first token (time to
first token) and a completion's last message always leave at once. With fewer streams
than the budget, every token leaves with the step that sampled it.
"""

from collections import OrderedDict

from services.scheduler.outputs import RequestOutput

_Key = tuple[str, int]


class OutputCoalescer:
    def __init__(self, max_messages_per_step: int | None) -> None:
        """max_messages_per_step: None, no limit."""
        self.max_messages_per_step = max_messages_per_step
        # Held outputs, the one held longest first.
        self._held: OrderedDict[_Key, RequestOutput] = OrderedDict()

    def add(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Takes a step's outputs (or an abort's); returns those that leave at once, in
        order: first tokens and last messages, merged with what their completion held."""
        leaving = []
        for output in outputs:
            key = (output.request_id, output.index)
            held = self._held.get(key)
            if held is not None:
                output = output.absorb_earlier(held)
            first_tokens = output.num_output_tokens == len(output.new_token_ids) and output.new_token_ids
            if self.max_messages_per_step is None or output.finished or first_tokens:
                if held is not None:
                    del self._held[key]
                leaving.append(output)
            else:
                # A completion already waiting keeps its place in line.
                self._held[key] = output
        return leaving

    def take_due(self, num_sent: int = 0) -> list[RequestOutput]:
        """Held outputs whose turn it is this step, num_sent messages having left already."""
        if self.max_messages_per_step is None:
            return []
        count = min(len(self._held), max(0, self.max_messages_per_step - num_sent))
        return [self._held.popitem(last=False)[1] for _ in range(count)]

    def pace(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """One step's messages: add(outputs), then the held ones whose turn it is."""
        leaving = self.add(outputs)
        return leaving + self.take_due(len(leaving))

    def clear(self) -> None:
        self._held.clear()

    def flush(self) -> list[RequestOutput]:
        """Every held output, at once (their requests' steps are over for now)."""
        held = list(self._held.values())
        self._held.clear()
        return held

    def __len__(self) -> int:
        return len(self._held)
