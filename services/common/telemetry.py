"""Tracing set-up shared by the services: OTLP export configured only by the standard
OTEL_* variables, W3C trace context carried in gRPC metadata on every hop.

With no OTLP endpoint set no SDK is installed: spans are the API's non-recording ones and
cost next to nothing."""

import atexit
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

TRACER_NAME = "pagedserve"

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return any(environ.get(name) for name in _ENDPOINT_VARIABLES)


def setup_tracing(
    service_name: str, environ: Mapping[str, str], attributes: Mapping[str, AttributeValue] = {}
) -> bool:
    """Installs an SDK tracer provider exporting OTLP/gRPC when an endpoint is configured.
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG) and the
    exporter's own variables are read by the SDK as usual. Returns whether it did."""
    if not tracing_enabled(environ):
        return False
    # Imported here so that a service without tracing never loads the SDK.
    from opentelemetry.sdk.resources import Resource

    resource_attributes: dict[str, AttributeValue] = dict(attributes)
    if not environ.get("OTEL_SERVICE_NAME"):
        resource_attributes["service.name"] = service_name
    provider = install_tracer_provider(Resource.create(resource_attributes))
    atexit.register(provider.shutdown)
    return True


def install_tracer_provider(resource: "Resource") -> "TracerProvider":
    """The SDK's provider for `resource`, exporting OTLP/gRPC in batches, made global."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def context_from_metadata(metadata: tuple[tuple[str, str | bytes], ...] | None) -> Context:
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    return propagate.extract(carrier)


def traceparent_of(span: trace.Span) -> str:
    """The W3C traceparent of `span`, for a peer that links to it rather than continuing it."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def span_context_of(traceparent: str) -> trace.SpanContext | None:
    if not traceparent:
        return None
    context = trace.get_current_span(propagate.extract({"traceparent": traceparent})).get_span_context()
    return context if context.is_valid else None
