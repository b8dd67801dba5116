"""The generated tokens' log-probabilities in OpenAI's two shapes: the completions API's
parallel lists and the chat API's list of token objects. Each token is shown as its own
text, special tokens included."""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.v1 import common_pb2

from services.tokenizer.http.responses import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from services.tokenizer.tokenizer import TextTokenizer


class LogprobsFormatter:
    def __init__(self, tokenizer: TextTokenizer, num_top: int) -> None:
        self._tokenizer = tokenizer
        # The worker sends as many top tokens as the most any request of its step asked
        # for; each request shows its own number.
        self._num_top = num_top

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def add_completion(
        self, into: CompletionLogprobs, token_ids: Sequence[int], logprobs: Sequence[common_pb2.TokenLogprobs]
    ) -> None:
        """Appends the tokens to `into`, their text offsets continuing its last."""
        offset = into.text_offset[-1] + len(into.tokens[-1]) if into.tokens else 0
        for token_id, entry in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            into.tokens.append(text)
            into.token_logprobs.append(entry.logprob)
            into.top_logprobs.append({self.token_text(i): v for i, v in self._top(entry)})
            into.text_offset.append(offset)
            offset += len(text)

    def with_prompt(
        self,
        generated: CompletionLogprobs,
        prompt_ids: Sequence[int],
        prompt_logprobs: Sequence[common_pb2.TokenLogprobs],
    ) -> CompletionLogprobs:
        """An echoed choice's logprobs: the prompt's tokens (the first with none, as
        nothing predicts it), then the generated ones, offsets continuing the prompt's."""
        echoed = CompletionLogprobs()
        if prompt_ids:
            echoed.tokens.append(self.token_text(prompt_ids[0]))
            echoed.token_logprobs.append(None)
            echoed.top_logprobs.append(None)
            echoed.text_offset.append(0)
            self.add_completion(echoed, prompt_ids[1:], prompt_logprobs)
        shift = echoed.text_offset[-1] + len(echoed.tokens[-1]) if echoed.tokens else 0
        echoed.tokens += generated.tokens
        echoed.token_logprobs += generated.token_logprobs
        echoed.top_logprobs += generated.top_logprobs
        echoed.text_offset += [offset + shift for offset in generated.text_offset]
        return echoed

    def chat(
        self, token_ids: Sequence[int], logprobs: Sequence[common_pb2.TokenLogprobs]
    ) -> list[ChatTokenLogprob]:
        return [
            ChatTokenLogprob(
                **self._top_logprob(token_id, entry.logprob).model_dump(),
                top_logprobs=[self._top_logprob(i, v) for i, v in self._top(entry)],
            )
            for token_id, entry in zip(token_ids, logprobs)
        ]

    def _top(self, entry: common_pb2.TokenLogprobs) -> list[tuple[int, float]]:
        return list(zip(entry.top_token_ids, entry.top_logprobs))[: self._num_top]

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
