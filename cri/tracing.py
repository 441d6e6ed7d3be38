"""OpenTelemetry tracing, set up from the [tracing] config table.

With exporter "none" no tracer provider is installed and `tracer()` returns
None: the boundary then skips span creation entirely, so tracing costs nothing.
Not even an import: OpenTelemetry (~50 modules, a few MiB) is loaded by
`setup()` only when an exporter is configured, so an idle daemon without
tracing never has it in memory. Code outside this module makes its spans with
`child_span()`, never with OpenTelemetry's global tracer.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cri import __version__
from cri.config import TracingConfig
from cri.errors import FailedPrecondition

if TYPE_CHECKING:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def _exporter(cfg: TracingConfig) -> SpanExporter:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if cfg.exporter == "console":
        return ConsoleSpanExporter(out=sys.stdout)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore
            OTLPSpanExporter,
        )
    except ImportError:
        raise FailedPrecondition(
            "tracing.exporter = \"otlp\" needs the opentelemetry-exporter-otlp package") from None
    exporter: SpanExporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint)
    return exporter


def setup(cfg: TracingConfig) -> None:
    """Install (or remove) the tracer provider for this config."""
    global _provider, _tracer
    shutdown()
    if cfg.exporter == "none":
        return
    # The one place OpenTelemetry is loaded: only when tracing is on (see the docstring).
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    provider = TracerProvider(resource=Resource.create({"service.name": "crib",
                                                        "service.version": __version__}),
                              sampler=TraceIdRatioBased(cfg.sample_ratio))
    provider.add_span_processor(BatchSpanProcessor(_exporter(cfg)))
    _provider, _tracer = provider, provider.get_tracer("crib")
    log.info("tracing enabled, exporter %s", cfg.exporter)


def shutdown() -> None:
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer = None, None


def tracer() -> trace.Tracer | None:
    return _tracer


@contextlib.contextmanager
def child_span(name: str, **attributes: Any) -> Iterator[trace.Span | None]:
    """A child span around a runc/CNI/registry call; a no-op when tracing is off."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span


def set_error(span: trace.Span, description: str) -> None:
    """Mark `span` (from a tracer of this module, so OpenTelemetry is loaded) as failed."""
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))
