"""The worker's step spans, made by their own process from what the worker writes down a
pipe, exported to a real OTLP receiver."""

import pytest

from devtools.otlp_receiver import trace_receiver, tracing_to
from gpu_worker.step_spans import StepSpanRecord, StepSpanWriter

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def _traceparent(span_id: str) -> str:
    return f"00-{TRACE_ID}-{span_id}-01"


def _record(step_id: int, seq_ids: list[int], **sequences: list) -> StepSpanRecord:
    start_ns = 1_700_000_000_000_000_000 + step_id * 10_000_000
    attributes = {"pagedserve.step.id": step_id, "pagedserve.step.batch_size": len(seq_ids)}
    return StepSpanRecord(start_ns, start_ns + 5_000_000, seq_ids, attributes, **sequences)


def test_steps_link_the_traced_sequences_they_served_until_those_finish() -> None:
    with trace_receiver() as (receiver, endpoint), tracing_to(endpoint):
        writer = StepSpanWriter()
        # Sequence 3 has no traceparent: an unsampled request, never linked.
        writer.write(
            _record(
                1,
                [1, 2, 3],
                new_traceparents=[
                    (1, _traceparent("00000000000000a1")),
                    (2, _traceparent("00000000000000a2")),
                ],
            )
        )
        writer.write(_record(2, [1, 2, 3]))
        writer.write(_record(3, [2, 3], finished_seq_ids=[1]))
        # Sequence 1's id comes back for a new, untraced request: no stale link.
        writer.write(_record(4, [1, 2], finished_seq_ids=[3]))
        writer.close()
        spans = receiver.wait_for(lambda spans: len(spans) == 4)
    steps = {s.attributes["pagedserve.step.id"]: s for s in spans}
    assert {name for name in (s.name for s in spans)} == {"worker.step"}
    assert [len(steps[i].links) for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    assert steps[3].links == [(TRACE_ID, "00000000000000a2")]
    assert steps[4].links == [(TRACE_ID, "00000000000000a2")]
    assert [steps[i].attributes["pagedserve.step.num_requests"] for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    # The step's own times, taken by the worker, not when the span process got to it.
    first = _record(1, [])
    assert (steps[1].start_time_unix_nano, steps[1].end_time_unix_nano) == (first.start_ns, first.end_ns)
    # Step spans are roots: a step serves many requests and belongs to no single trace.
    assert all(s.parent_span_id == "" for s in spans)


def test_a_dead_span_process_leaves_the_worker_stepping(caplog: pytest.LogCaptureFixture) -> None:
    with trace_receiver() as (_, endpoint), tracing_to(endpoint):
        writer = StepSpanWriter()
        process = writer._process
        assert process is not None
        process.kill()
        process.wait()
        for step_id in range(1, 100):
            writer.write(_record(step_id, list(range(64))))
        writer.close()
    assert "the step span process is gone" in caplog.text
