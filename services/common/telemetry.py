"""OpenTelemetry: tracer and meter providers, OTLP export when configured.

Trace context travels in gRPC metadata through the public instrumentation
package's interceptors, so one request is one trace across router → auth →
worker. Nothing is exported unless OTEL_EXPORTER_OTLP_ENDPOINT is set.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_configured: dict[str, TracerProvider] = {}


def configure_telemetry(
    service: str, otlp_endpoint: str | None, extra_processor: SpanProcessor | None = None
) -> TracerProvider:
    """Install a tracer provider named for `service` (once per process)."""
    if "provider" in _configured:
        return _configured["provider"]
    provider = TracerProvider(resource=Resource.create({"service.name": f"tokenyard-{service}"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
    trace.set_tracer_provider(provider)
    _configured["provider"] = provider
    return provider


def shutdown_telemetry() -> None:
    """Flush and stop exporters (on service stop)."""
    provider = _configured.pop("provider", None)
    if provider is not None:
        provider.shutdown()


def server_tracing_interceptor() -> Any:
    """Server interceptor that continues the caller's trace (W3C context in metadata)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor()


def client_tracing_interceptors() -> list[Any]:
    """Client interceptors that send the current trace context with each call."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def tracer(name: str) -> trace.Tracer:
    """A tracer for spans of our own (queueing, prefill, decode)."""
    return trace.get_tracer(name)


def trace_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata (`traceparent`…), for calls made
    without the client interceptors (the router's raw worker stubs)."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())
