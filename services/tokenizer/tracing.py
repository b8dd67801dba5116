"""The request's story in OpenTelemetry GenAI terms, set on the tokenizer's server span."""

import time

from opentelemetry import trace
from pagedserve.v1 import common_pb2, generation_pb2

from services.common.metrics import finish_reason_label
from services.tokenizer.frontend import PreparedRequest


class RequestTrace:
    """Collects what the server span says once the request ends: token counts, finish
    reasons, time to first token. Cheap when tracing is off (the span does not record)."""

    def __init__(
        self,
        span: trace.Span,
        model: common_pb2.ModelInfo,
        request: generation_pb2.GenerateRequest,
        prepared: PreparedRequest,
    ) -> None:
        self.span = span
        self._started = time.monotonic()
        self._first_token_at: float | None = None
        self._output_tokens = 0
        self._finish_reasons: list[str] = []
        if not span.is_recording():
            return
        sampling = prepared.sampling
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat" if request.messages else "text_completion",
                "gen_ai.system": "pagedserve",
                "gen_ai.request.model": model.model_name,
                "gen_ai.request.id": prepared.request_id,
                "gen_ai.request.max_tokens": sampling.max_tokens,
                "gen_ai.request.temperature": sampling.temperature
                if sampling.HasField("temperature")
                else 1.0,
                "gen_ai.request.top_p": sampling.top_p if sampling.HasField("top_p") else 1.0,
                "gen_ai.request.top_k": sampling.top_k,
                "gen_ai.request.choice.count": sampling.n if sampling.HasField("n") else 1,
                "gen_ai.usage.input_tokens": len(prepared.prompt_token_ids),
            }
        )

    def on_message(self, message: generation_pb2.GenerateResponse) -> None:
        if message.token_ids and self._first_token_at is None:
            self._first_token_at = time.monotonic()
        self._output_tokens += len(message.token_ids)
        if message.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self._finish_reasons.append(finish_reason_label(message.finish_reason))

    def end(self) -> None:
        if not self.span.is_recording():
            return
        self.span.set_attribute("gen_ai.usage.output_tokens", self._output_tokens)
        self.span.set_attribute("gen_ai.response.finish_reasons", self._finish_reasons)
        if self._first_token_at is not None:
            self.span.set_attribute("pagedserve.time_to_first_token_s", self._first_token_at - self._started)
