"""What the worker tells about its steps: one span per batch step, linked to the scheduler
spans of the requests it served (never a span per token), and Prometheus metrics."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from pagedserve.v1 import worker_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gpu_worker.device_time import DeviceTimer
from gpu_worker.speculative.metrics import SpeculationMetrics
from gpu_worker.step_pipeline import StepRecord
from services.common.metrics import PREFIX, STEP_BUCKETS
from services.common.telemetry import span_context_of, tracer


def count_tokens(step: worker_pb2.StepRequest) -> tuple[int, int]:
    """(prefill tokens, decode tokens): a decode is one token of a sequence already known."""
    new_seq_ids = {new.seq_id for new in step.new_sequences}
    decode = sum(1 for s in step.scheduled if s.num_new_tokens == 1 and s.seq_id not in new_seq_ids)
    total = sum(s.num_new_tokens for s in step.scheduled)
    return total - decode, decode


class _DeviceSeconds(Collector):
    """The device timer's totals, read when Prometheus scrapes (nothing per step)."""

    def __init__(self, registry: CollectorRegistry, rank: str) -> None:
        self.timer: DeviceTimer | None = None
        self._rank = rank
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            PREFIX + "worker_device_seconds",
            "Device time spent computing steps, by kind (decode-only steps, steps with prompt tokens); "
            "its rate is the fraction of time the device is busy.",
            labels=["kind", "rank"],
        )
        if self.timer is not None:
            for kind, seconds in list(self.timer.seconds.items()):
                family.add_metric([kind, self._rank], seconds)
        yield family


class StepTelemetry:
    """`rank`: this worker's rank in its engine, a label on each of its metrics, so that
    the ranks of one engine can be told apart (0 for an engine of one worker)."""

    def __init__(self, registry: CollectorRegistry, rank: int = 0) -> None:
        self._device_seconds = _DeviceSeconds(registry, str(rank))
        # Scheduler spans of the live sequences; empty while tracing is off (no traceparent).
        self._request_spans: dict[int, trace.SpanContext] = {}
        self._duration = Histogram(
            PREFIX + "worker_step_duration_seconds",
            "One step on the worker, from its arrival until its result has left.",
            ["rank"],
            registry=registry,
            buckets=STEP_BUCKETS,
        ).labels(str(rank))
        tokens = Counter(
            PREFIX + "worker_step_tokens", "Tokens computed, by kind.", ["kind", "rank"], registry=registry
        )
        self._prefill_tokens = tokens.labels("prefill", str(rank))
        self._decode_tokens = tokens.labels("decode", str(rank))
        self._speculation = SpeculationMetrics(registry, rank)

    def watch_device(self, timer: DeviceTimer) -> None:
        """Exports the timer's totals from now on (the worker has one once its model loaded)."""
        self._device_seconds.timer = timer

    def _follow_sequences(self, step: worker_pb2.StepRequest) -> None:
        for seq_id in step.finished_seq_ids:
            self._request_spans.pop(seq_id, None)
        for new in step.new_sequences:
            context = span_context_of(new.traceparent)
            if context is not None:
                self._request_spans[new.seq_id] = context

    @contextmanager
    def step(self, step: worker_pb2.StepRequest, cuda_graphs: bool) -> Iterator[StepRecord]:
        """Around one step, from its arrival until its result has left. Only what the span
        needs at its start is computed on arrival; the rest once the result is on its way,
        off the path from the scheduler to the device and back."""
        self._follow_sequences(step)
        request_spans = self._request_spans
        links = (
            [trace.Link(request_spans[s.seq_id]) for s in step.scheduled if s.seq_id in request_spans]
            if request_spans
            else []
        )
        attributes = {
            "pagedserve.step.id": step.step_id,
            "pagedserve.step.batch_size": len(step.scheduled),
            "pagedserve.step.num_requests": len({link.context.span_id for link in links}),
        }
        started = time.monotonic()
        # A root span: a step serves many requests, so it belongs to no single trace.
        with tracer().start_as_current_span(
            "worker.step", context=Context(), links=links, attributes=attributes
        ) as span:
            record = StepRecord()
            yield record
            prefill_tokens, decode_tokens = count_tokens(step)
            if record.result is not None and record.result.speculation:
                self._speculation.record(record.result.speculation, span)
            if span.is_recording():
                span.set_attributes(
                    {
                        "pagedserve.step.prefill_tokens": prefill_tokens,
                        "pagedserve.step.decode_tokens": decode_tokens,
                        # Decode-only steps replay a captured CUDA graph when the worker has them.
                        # Verifying proposals runs eagerly.
                        "pagedserve.step.mode": "cuda_graph"
                        if cuda_graphs
                        and prefill_tokens == 0
                        and not any(s.num_lookahead_tokens for s in step.scheduled)
                        else "eager",
                    }
                )
        self._duration.observe(time.monotonic() - started)
        self._prefill_tokens.inc(prefill_tokens)
        self._decode_tokens.inc(decode_tokens)
