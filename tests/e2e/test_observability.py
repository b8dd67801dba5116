"""One trace per request across the three services, received by a real OTLP/gRPC receiver,
and Prometheus metrics that move by the right amounts."""

import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from pagedserve.v1 import common_pb2, generation_pb2
from prometheus_client.parser import text_string_to_metric_families

from devtools.otlp_receiver import ReceivedSpan, TraceReceiver, trace_receiver
from services.launcher import free_port
from tests.support.monitoring import referenced_metrics
from tests.support.service_stack import Stack, service_stack

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
GENERATE_SPAN = "pagedserve.v1.Generation/Generate"
SUBMIT_SPAN = "scheduler.request"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def observed(embedded_model_dir: Path, tmp_path_factory) -> tuple[Stack, TraceReceiver, dict[str, int]]:
    ports = {name: free_port() for name in ("tokenizer", "scheduler", "worker")}
    with trace_receiver() as (receiver, endpoint):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        }
        # A pool of 24 blocks of 16 tokens: four 100-token requests outgrow it together.
        with service_stack(
            embedded_model_dir,
            tmp_path_factory.mktemp("observed"),
            env=env,
            worker_args=["--metrics-port", str(ports["worker"])],
            scheduler_args=["--metrics-port", str(ports["scheduler"]), "--num-kv-blocks", "24"],
            tokenizer_args=["--metrics-port", str(ports["tokenizer"])],
        ) as stack:
            yield stack, receiver, ports


def _generate(stack: Stack, prompt: str, metadata: tuple = ()) -> list[generation_pb2.GenerateResponse]:
    request = generation_pb2.GenerateRequest(
        prompt=prompt,
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    return list(stack.generation.Generate(request, metadata=metadata, timeout=120))


def _one(spans: list[ReceivedSpan], **fields) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, key) == value for key, value in fields.items())]
    assert len(found) == 1, (fields, [(s.name, s.trace_id) for s in spans])
    return found[0]


def test_one_trace_follows_the_request_through_all_services(observed) -> None:
    stack, receiver, _ = observed
    prompt = "The capital of France is"
    _generate(stack, prompt, metadata=(("traceparent", f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"),))

    def complete(spans: list[ReceivedSpan]) -> bool:
        submits = [s for s in spans if s.name == SUBMIT_SPAN and s.trace_id == CLIENT_TRACE_ID]
        # Every step's span, each one exported when its step's result is back.
        linked = Counter(span_id for s in spans if s.name == "worker.step" for _, span_id in s.links)
        return any(s.name == GENERATE_SPAN and s.trace_id == CLIENT_TRACE_ID for s in spans) and any(
            linked[s.span_id] >= MAX_TOKENS for s in submits
        )

    spans = receiver.wait_for(complete)
    in_trace = [s for s in spans if s.trace_id == CLIENT_TRACE_ID]
    by_id = {s.span_id: s for s in in_trace}

    generate = _one(in_trace, name=GENERATE_SPAN)
    assert generate.service_name == "pagedserve-tokenizer"
    assert generate.parent_span_id == CLIENT_SPAN_ID
    tokenize = _one(in_trace, name="tokenize")
    stream = _one(in_trace, name="detokenize_stream")
    assert tokenize.parent_span_id == stream.parent_span_id == generate.span_id

    submit = _one(in_trace, name=SUBMIT_SPAN)
    assert submit.service_name == "pagedserve-scheduler"
    ancestor, ancestry = submit, []
    while ancestor.parent_span_id in by_id:
        ancestor = by_id[ancestor.parent_span_id]
        ancestry.append(ancestor.span_id)
    assert generate.span_id in ancestry
    assert [name for name, _ in submit.events] == ["queued", "scheduled", "first_token"]

    steps = [s for s in spans if s.name == "worker.step" and (CLIENT_TRACE_ID, submit.span_id) in s.links]
    assert steps, "no worker step links to the scheduler's span"
    assert {s.service_name for s in steps} == {"pagedserve-worker"}
    assert steps[0].resource["pagedserve.worker.rank"] == 0
    assert sum(s.attributes["pagedserve.step.decode_tokens"] for s in steps) == MAX_TOKENS - 1
    # Never a span per token: the request's decodes shared steps, one span each.
    assert len(steps) == MAX_TOKENS

    prompt_tokens = len(stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=prompt)).token_ids)
    for span in (generate, submit):
        assert span.attributes["gen_ai.usage.input_tokens"] == prompt_tokens
        assert span.attributes["gen_ai.usage.output_tokens"] == MAX_TOKENS
        assert span.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert generate.attributes["gen_ai.request.max_tokens"] == MAX_TOKENS
    assert generate.attributes["gen_ai.request.temperature"] == 0.0
    assert generate.attributes["gen_ai.request.model"] == "SmolLM2-135M-Instruct"
    assert generate.attributes["pagedserve.time_to_first_token_s"] > 0
    assert submit.attributes["pagedserve.time_in_queue_s"] >= 0


def test_a_request_without_trace_context_starts_a_trace(observed) -> None:
    stack, receiver, _ = observed
    responses = _generate(stack, "A fresh trace")
    request_id = responses[-1].request_id
    spans = receiver.wait_for(
        lambda spans: any(
            s.name == GENERATE_SPAN and s.attributes.get("gen_ai.request.id") == request_id for s in spans
        )
    )
    generate = next(
        s for s in spans if s.name == GENERATE_SPAN and s.attributes.get("gen_ai.request.id") == request_id
    )
    assert generate.parent_span_id == ""
    assert generate.trace_id != CLIENT_TRACE_ID
    receiver.wait_for(
        lambda spans: any(s.name == SUBMIT_SPAN and s.trace_id == generate.trace_id for s in spans)
    )


def test_preemptions_and_prefix_cache_hits_are_events_of_the_request(observed) -> None:
    stack, receiver, _ = observed
    prompts = [" ".join(f"{word}{i}" for i in range(38)) for word in ("apple", "river", "stone", "cloud")]
    for prompt in prompts:
        num_tokens = len(stack.generation.Tokenize(generation_pb2.TokenizeRequest(text=prompt)).token_ids)
        assert 96 < num_tokens <= 112, num_tokens  # 7 blocks each: together they outgrow the pool
    trace_ids = [f"{i + 1:032x}" for i in range(len(prompts) + 2)]

    def generate(prompt: str, trace_id: str) -> None:
        request = generation_pb2.GenerateRequest(
            prompt=prompt, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        )
        list(
            stack.generation.Generate(
                request, metadata=(("traceparent", f"00-{trace_id}-{CLIENT_SPAN_ID}-01"),), timeout=120
            )
        )

    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(generate, prompts, trace_ids))
    # The pool may have evicted any of them meanwhile; the second of two in a row finds
    # every full block of its prompt cached.
    generate(prompts[0], trace_ids[-2])
    generate(prompts[0], trace_ids[-1])

    spans = receiver.wait_for(
        lambda spans: {s.trace_id for s in spans if s.name == SUBMIT_SPAN} >= set(trace_ids)
    )
    events = {s.trace_id: s.events for s in spans if s.name == SUBMIT_SPAN and s.trace_id in trace_ids}
    preempted = [
        attributes
        for trace_id in trace_ids[: len(prompts)]
        for name, attributes in events[trace_id]
        if name == "preempted"
    ]
    assert preempted, "four requests outgrew the pool together, yet no trace tells of a preemption"
    assert {attributes["pagedserve.preemption_mode"] for attributes in preempted} == {"recompute"}
    hits = [attributes for name, attributes in events[trace_ids[-1]] if name == "prefix_cache_hit"]
    assert len(hits) == 1 and hits[0]["pagedserve.cached_tokens"] == 96  # 6 full blocks of 104 tokens


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _generate_calls_answered(metrics: dict[str, dict[tuple[str, tuple], float]]) -> float:
    return sum(
        value
        for (name, labels), value in metrics["tokenizer"].items()
        if name == "pagedserve:grpc_server_handled_total" and ("method", "Generate") in labels
    )


def _settled_metrics(
    ports: dict[str, int], generate_calls: float = 0, timeout_s: float = 120.0
) -> dict[str, dict[tuple[str, tuple], float]]:
    """Every service's metrics once the worker has recorded each step whose result the
    scheduler has, and the tokenizer has counted `generate_calls` Generate calls in all:
    the worker records a step after its result has left, and the tokenizer counts a call
    once its answer has left, so just after a request ends either may lag."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = {name: _scrape(port) for name, port in ports.items()}
        worker_steps = metrics["worker"].get(
            ("pagedserve:worker_step_duration_seconds_count", (("rank", "0"),))
        )
        scheduler_steps = metrics["scheduler"].get(("pagedserve:step_duration_seconds_count", ()))
        answered = _generate_calls_answered(metrics)
        if worker_steps == scheduler_steps and answered >= generate_calls:
            return metrics
        assert time.monotonic() < deadline, (
            f"worker recorded {worker_steps} steps, scheduler {scheduler_steps}; "
            f"tokenizer counted {answered} of {generate_calls} Generate calls"
        )
        time.sleep(0.05)


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_by_the_right_amounts(observed) -> None:
    stack, _, ports = observed
    before = _settled_metrics(ports)
    started = time.monotonic()
    for prompt in ("One", "Two two", "Three three three"):
        _generate(stack, prompt)
    with pytest.raises(grpc.RpcError):
        list(stack.generation.Generate(generation_pb2.GenerateRequest(), timeout=30))
    elapsed = time.monotonic() - started
    after = _settled_metrics(ports, generate_calls=_generate_calls_answered(before) + 4)

    scheduler_before, scheduler_after = before["scheduler"], after["scheduler"]
    assert (
        _delta(
            scheduler_before, scheduler_after, "pagedserve:request_success_total", finished_reason="length"
        )
        == 3
    )
    assert _delta(scheduler_before, scheduler_after, "pagedserve:generation_tokens_total") == 3 * MAX_TOKENS
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_time_per_output_token_seconds",
    ):
        assert _delta(scheduler_before, scheduler_after, f"pagedserve:{histogram}_count") == 3, histogram
    assert _delta(scheduler_before, scheduler_after, "pagedserve:inter_token_latency_seconds_count") == 3 * (
        MAX_TOKENS - 1
    )
    assert _delta(scheduler_before, scheduler_after, "pagedserve:step_duration_seconds_count") >= MAX_TOKENS
    assert scheduler_after[("pagedserve:num_requests_running", ())] == 0
    assert scheduler_after[("pagedserve:kv_cache_usage_perc", ())] == 0.0

    tokenizer_before, tokenizer_after = before["tokenizer"], after["tokenizer"]
    for code, num_calls in (("OK", 3), ("INVALID_ARGUMENT", 1)):
        handled = _delta(
            tokenizer_before,
            tokenizer_after,
            "pagedserve:grpc_server_handled_total",
            method="Generate",
            code=code,
        )
        assert handled == num_calls, code

    worker_before, worker_after = before["worker"], after["worker"]
    assert _delta(
        worker_before, worker_after, "pagedserve:worker_step_tokens_total", kind="decode", rank="0"
    ) == 3 * (MAX_TOKENS - 1)
    assert (
        _delta(worker_before, worker_after, "pagedserve:worker_step_duration_seconds_count", rank="0")
        >= MAX_TOKENS
    )
    # Each request's prompt step and its decode steps took device time (on CPU: the
    # compute, timed on the host), all of it within the requests' own wall time.
    device = {
        kind: _delta(
            worker_before, worker_after, "pagedserve:worker_device_seconds_total", kind=kind, rank="0"
        )
        for kind in ("prefill", "decode")
    }
    assert all(seconds > 0 for seconds in device.values()), device
    assert sum(device.values()) < elapsed, (device, elapsed)


def test_dashboards_and_alerts_query_metrics_that_exist(observed) -> None:
    stack, _, ports = observed
    _generate(stack, "Every panel has data")
    exported = {name for port in ports.values() for name, _ in _scrape(port)}
    missing = {name for name in referenced_metrics() if name not in exported}
    assert not missing, f"queried but never exported: {missing}"
