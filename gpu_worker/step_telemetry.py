"""What the worker tells about its steps: one span per batch step, linked to the scheduler
spans of the requests it served (never a span per token), and Prometheus metrics."""

import atexit
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from opentelemetry.util.types import AttributeValue
from pagedserve.v1 import worker_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gpu_worker.device_time import DeviceTimer
from gpu_worker.late_compiles import LateCompiles
from gpu_worker.speculative.metrics import SpeculationMetrics
from gpu_worker.step_pipeline import StepRecord
from gpu_worker.step_spans import StepSpanRecord, StepSpanWriter, tracing_installed
from services.common.metrics import PREFIX, STEP_BUCKETS


@dataclass(slots=True)
class _StepContents:
    prefill_tokens: int = 0
    # A decode is one token of a sequence already known.
    decode_tokens: int = 0
    # The scheduled sequences, in order; only gathered for the step's span.
    seq_ids: list[int] = field(default_factory=list)


def _contents(step: worker_pb2.StepRequest, with_seq_ids: bool) -> _StepContents:
    """One pass over the scheduled sequences: at 256 of them each pass costs tens of
    microseconds of protobuf field reads."""
    contents = _StepContents()
    new_seq_ids = {new.seq_id for new in step.new_sequences}
    seq_ids = contents.seq_ids
    total = 0
    for scheduled in step.scheduled:
        seq_id, num_new_tokens = scheduled.seq_id, scheduled.num_new_tokens
        total += num_new_tokens
        if num_new_tokens == 1 and seq_id not in new_seq_ids:
            contents.decode_tokens += 1
        if with_seq_ids:
            seq_ids.append(seq_id)
    contents.prefill_tokens = total - contents.decode_tokens
    return contents


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
    the ranks of one engine can be told apart (0 for an engine of one worker). With tracing
    installed, each step's span goes to a span process of its own (gpu_worker/step_spans.py)."""

    def __init__(self, registry: CollectorRegistry, rank: int = 0) -> None:
        self._device_seconds = _DeviceSeconds(registry, str(rank))
        self._spans = StepSpanWriter() if tracing_installed() else None
        if self._spans is not None:
            atexit.register(self._spans.close)
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
        self.late_compiles = LateCompiles(registry, rank)

    def watch_device(self, timer: DeviceTimer) -> None:
        """Exports the timer's totals from now on (the worker has one once its model loaded)."""
        self._device_seconds.timer = timer

    @contextmanager
    def step(self, step: worker_pb2.StepRequest) -> Iterator[StepRecord]:
        """Around one step, from its arrival until its result has left. Nothing but the
        clock is read on arrival; the rest once the result is on its way, off the path from
        the scheduler to the device and back."""
        started = time.monotonic()
        started_ns = time.time_ns()
        record = StepRecord()
        yield record
        ended_ns = time.time_ns()
        self._duration.observe(time.monotonic() - started)
        contents = _contents(step, with_seq_ids=self._spans is not None)
        self._prefill_tokens.inc(contents.prefill_tokens)
        self._decode_tokens.inc(contents.decode_tokens)
        speculation = (
            self._speculation.record(record.result.speculation)
            if record.result is not None and record.result.speculation
            else {}
        )
        if self._spans is None:
            return
        attributes: dict[str, AttributeValue] = {
            "pagedserve.step.id": step.step_id,
            "pagedserve.step.batch_size": len(step.scheduled),
            "pagedserve.step.prefill_tokens": contents.prefill_tokens,
            "pagedserve.step.decode_tokens": contents.decode_tokens,
            "pagedserve.step.mode": "cuda_graph" if record.replayed_graph else "eager",
            **speculation,
        }
        self._spans.write(
            StepSpanRecord(
                start_ns=started_ns,
                end_ns=ended_ns,
                seq_ids=contents.seq_ids,
                attributes=attributes,
                new_traceparents=[
                    (new.seq_id, new.traceparent) for new in step.new_sequences if new.traceparent
                ],
                finished_seq_ids=list(step.finished_seq_ids),
            )
        )
