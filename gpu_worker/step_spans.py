"""The worker's step spans, made and exported by a process of their own.

A step span links to every traced request the step served: at 256 sequences that is 256
links to validate when the span starts and to encode when it is exported, a millisecond or
more of Python per step. In the worker that work would hold the interpreter lock the step
pipeline needs between launches. Instead the worker writes each step's sequence ids and
attributes down a pipe (a small fraction of that), and this process keeps the requests'
span contexts, builds the spans with the step's own start and end times, and exports
them.

    python -m gpu_worker.step_spans     # started by StepSpanWriter, fed on its stdin
"""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from typing import BinaryIO

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepSpanRecord:
    """One step as its span needs it. Sequences are followed across steps by the span
    process: `new_traceparents` names the traced sequences that join with this step,
    `finished_seq_ids` those that left before it."""

    start_ns: int
    end_ns: int
    seq_ids: list[int]
    attributes: dict[str, AttributeValue]
    new_traceparents: list[tuple[int, str]] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)


def tracing_installed() -> bool:
    """Whether this process exports spans (services.common.telemetry.setup_tracing ran)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


class StepSpanWriter:
    """The worker's end of the pipe. The span process inherits the environment, so it
    exports where the worker would; it takes the worker's resource (service name, rank) so
    that its spans read as the worker's. If it dies, steps go on untraced."""

    def __init__(self) -> None:
        resource = getattr(trace.get_tracer_provider(), "resource", None)
        attributes = dict(resource.attributes) if resource is not None else {}
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker.step_spans"], stdin=subprocess.PIPE
        )
        self._write(attributes)

    def write(self, record: StepSpanRecord) -> None:
        self._write(record)

    def _write(self, item: object) -> None:
        if self._process is None:
            return
        stdin = self._process.stdin
        assert stdin is not None
        try:
            pickle.dump(item, stdin, protocol=pickle.HIGHEST_PROTOCOL)
            stdin.flush()
        except (BrokenPipeError, OSError):
            log.error(
                "the step span process is gone (exit status %s): steps are no longer traced",
                self._process.poll(),
            )
            self._process = None

    def close(self, timeout_s: float = 10.0) -> None:
        """Lets the span process export what it holds, and waits for it."""
        if self._process is None:
            return
        process, self._process = self._process, None
        try:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()


def _serve(stream: BinaryIO) -> None:
    # Imported here: the worker itself never needs the SDK for its step spans.
    from opentelemetry.sdk.resources import Resource

    from services.common.telemetry import install_tracer_provider, span_context_of, tracer

    provider = install_tracer_provider(Resource(pickle.load(stream)))
    step_tracer = tracer()
    # Each live traced sequence's link to its scheduler span, made once per sequence.
    links: dict[int, trace.Link] = {}
    try:
        while True:
            try:
                record: StepSpanRecord = pickle.load(stream)
            except EOFError:
                break
            for seq_id in record.finished_seq_ids:
                links.pop(seq_id, None)
            for seq_id, traceparent in record.new_traceparents:
                context = span_context_of(traceparent)
                if context is not None:
                    links[seq_id] = trace.Link(context)
            step_links = [links[seq_id] for seq_id in record.seq_ids if seq_id in links] if links else []
            attributes = record.attributes
            attributes["pagedserve.step.num_requests"] = len({link.context.span_id for link in step_links})
            # A root span: a step serves many requests, so it belongs to no single trace.
            span = step_tracer.start_span(
                "worker.step",
                context=Context(),
                links=step_links,
                attributes=attributes,
                start_time=record.start_ns,
            )
            span.end(end_time=record.end_ns)
    finally:
        provider.shutdown()


if __name__ == "__main__":
    _serve(sys.stdin.buffer)
