"""What one request of the serving benchmark saw, and the run's summary with the meanings
vLLM's `bench serve` gives them:

- TTFT: from sending the request to its first output token.
- TPOT: per request, (end-to-end latency - TTFT) / (output tokens - 1), for requests with
  more than one token.
- ITL: the gaps between consecutive streamed messages of a request, over all requests (a
  message may carry several tokens when the server merges them).
- E2EL: from sending the request to its last token.
- Goodput: completed requests per second that met every SLO given (TTFT, TPOT, E2EL).
- Tokens per message: output tokens over streamed messages; above 1 the server merged
  tokens (its per-step message budget), and each merged message counts as one long ITL.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    prompt_len: int
    # time.perf_counter() when sent, and at each streamed message that carried tokens.
    sent_at: float
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    # None when the request completed; else the status or exception that ended it.
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent_at

    @property
    def e2el(self) -> float:
        return self.token_times[-1] - self.sent_at

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass(frozen=True)
class Slo:
    """Service-level objectives in milliseconds; None: not part of goodput."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        checks = ((self.ttft_ms, record.ttft), (self.tpot_ms, record.tpot), (self.e2el_ms, record.e2el))
        return all(limit is None or value is None or value * 1000 <= limit for limit, value in checks)


def _distribution_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    ordered = sorted(v * 1000 for v in values)
    # Nearest-rank on the sorted values, as numpy's "lower" percentile.
    ranks = {f"p{p}": ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] for p in PERCENTILES}
    return {"mean": statistics.fmean(ordered), **ranks}


def summarize(records: list[RequestRecord], duration_s: float, slo: Slo) -> dict:
    """The run's summary: counts, throughputs and each latency's mean and percentiles."""
    done = [r for r in records if r.error is None and r.token_times]
    errors: dict[str, int] = {}
    for record in records:
        if record.error is not None:
            errors[record.error] = errors.get(record.error, 0) + 1
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_len for r in done)
    tpots = [t for r in done if (t := r.tpot) is not None]
    messages = sum(len(r.token_times) for r in done)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": errors,
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "goodput": sum(slo.met_by(r) for r in done) / duration_s,
        "tokens_per_message": output_tokens / messages if messages else 0.0,
        "ttft_ms": _distribution_ms([r.ttft for r in done]),
        "tpot_ms": _distribution_ms(tpots),
        "itl_ms": _distribution_ms([gap for r in done for gap in r.itls]),
        "e2el_ms": _distribution_ms([r.e2el for r in done]),
    }
