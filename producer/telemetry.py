"""OpenTelemetry setup from the standard environment, shared by producers and workers.

Nothing here runs at import time, and nothing heavy is imported until an endpoint is
configured: with no ``OTEL_EXPORTER_OTLP_ENDPOINT`` (nor its alias ``OTLP_ENDPOINT``, nor a
per-signal endpoint, nor ``FLEET_PROMETHEUS_PORT``) :func:`setup` installs no provider, builds
no exporter and opens no connection; the global OpenTelemetry API then stays a no-op.

Environment (standard names; see docs/OBSERVABILITY.md):

``OTEL_EXPORTER_OTLP_ENDPOINT``
    Base OTLP endpoint, e.g. ``http://otel-collector:4317`` (gRPC) or ``http://host:4318`` (HTTP).
    ``OTLP_ENDPOINT`` is accepted as an alias. ``OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_ENDPOINT``
    override it per signal (used as given, also for HTTP).
``OTEL_EXPORTER_OTLP_PROTOCOL``
    ``grpc`` (default, as Python's auto-configuration) or ``http/protobuf``; per signal with
    ``OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_PROTOCOL``.
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``
    Override the service name and add or override resource attributes.
``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER``, ``OTEL_LOGS_EXPORTER``
    ``otlp`` or ``none``. Traces and metrics default to ``otlp``; logs to ``none`` (the compose
    collector has no logs pipeline); set ``otlp`` to ship log records too.
``OTEL_SDK_DISABLED=true``
    Turns everything off whatever else is set.

The SDK itself reads the rest (``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``,
``..._COMPRESSION``, ``..._CERTIFICATE``, ``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_INTERVAL``).

This module must stay light: the producer imports it, and the producer never imports
torch or worker code.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from producer.optional import require_extra

log = logging.getLogger(__name__)

#: The message header that carries the enqueue time (UNIX seconds, float) to the worker.
ENQUEUED_AT_HEADER = "fleet_enqueued_at"

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENDPOINT_ALIAS_ENV = "OTLP_ENDPOINT"
PROMETHEUS_PORT_ENV = "FLEET_PROMETHEUS_PORT"
PROTOCOL_GRPC = "grpc"
PROTOCOL_HTTP = "http/protobuf"
_SIGNALS = ("traces", "metrics", "logs")
_DEFAULT_EXPORTER = {"traces": "otlp", "metrics": "otlp", "logs": "none"}
#: Telemetry is off unless one of these is set (checked first, so that "off" costs a few lookups).
_ENABLING_ENV = (ENDPOINT_ENV, ENDPOINT_ALIAS_ENV, *(f"OTEL_EXPORTER_OTLP_{s.upper()}_ENDPOINT" for s in _SIGNALS),
                 PROMETHEUS_PORT_ENV)


def enqueue_headers() -> dict[str, float]:
    """Headers the producer adds to every task message (cheap: one clock read)."""
    return {ENQUEUED_AT_HEADER: time.time()}


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class SignalConfig:
    """Where one signal goes: ``endpoint`` is final (HTTP paths already appended)."""

    endpoint: str
    protocol: str


@dataclass(frozen=True)
class TelemetryConfig:
    """What the environment asks for. A signal is ``None`` when it is off."""

    traces: SignalConfig | None = None
    metrics: SignalConfig | None = None
    logs: SignalConfig | None = None
    prometheus_port: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.traces or self.metrics or self.logs or self.prometheus_port is not None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TelemetryConfig:
        env = os.environ if environ is None else environ
        if not any(env.get(name) for name in _ENABLING_ENV):
            return cls()
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        base = (env.get(ENDPOINT_ENV) or env.get(ENDPOINT_ALIAS_ENV) or "").strip()
        general_protocol = (env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or PROTOCOL_GRPC).strip().lower()
        signals: dict[str, SignalConfig | None] = {}
        for signal in _SIGNALS:
            exporter = (env.get(f"OTEL_{signal.upper()}_EXPORTER") or _DEFAULT_EXPORTER[signal]).strip().lower()
            specific = (env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or "").strip()
            protocol = (env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or general_protocol).strip().lower()
            if exporter == "none" or not (specific or base):
                signals[signal] = None
                continue
            if exporter != "otlp":
                log.warning("OTEL_%s_EXPORTER=%s is not supported by Fleet (otlp or none); using otlp",
                            signal.upper(), exporter)
            if protocol not in (PROTOCOL_GRPC, PROTOCOL_HTTP):
                log.warning("unsupported OTLP protocol %r for %s; using %s", protocol, signal, PROTOCOL_GRPC)
                protocol = PROTOCOL_GRPC
            if specific:
                endpoint = specific
            elif protocol == PROTOCOL_HTTP:
                endpoint = f"{base.rstrip('/')}/v1/{signal}"
            else:
                endpoint = base
            signals[signal] = SignalConfig(endpoint, protocol)
        return cls(prometheus_port=_port(env.get(PROMETHEUS_PORT_ENV)), **signals)


def _port(value: str | None) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    if value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    log.warning("%s=%r is not a TCP port; no Prometheus endpoint", PROMETHEUS_PORT_ENV, value)
    return None


# --- resource ------------------------------------------------------------------------------


def fleet_version() -> str:
    from producer.version import __version__

    return __version__


def resource_attributes(default_service_name: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fleet's own resource attributes; ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` override them."""
    attributes: dict[str, Any] = {
        "service.name": default_service_name,
        "service.namespace": "fleet",
        "service.version": fleet_version(),
        "service.instance.id": str(uuid.uuid4()),
        "host.name": os.environ.get("HOSTNAME") or socket.gethostname(),
        "process.pid": os.getpid(),
    }
    attributes.update({k: v for k, v in (extra or {}).items() if v is not None})
    return attributes


def build_resource(default_service_name: str, extra: Mapping[str, Any] | None = None):
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    # Resource.create adds telemetry.sdk.*; then the environment wins over Fleet's defaults.
    return Resource.create(resource_attributes(default_service_name, extra)).merge(OTELResourceDetector().detect())


# --- installed state -----------------------------------------------------------------------


@dataclass
class Telemetry:
    """The providers this process installed. ``flush`` and ``shutdown`` are safe to call twice."""

    config: TelemetryConfig
    resource: Any = None
    tracer_provider: Any = None
    meter_provider: Any = None
    logger_provider: Any = None
    log_handler: logging.Handler | None = None
    _shutdown_hooks: list[Callable[[], None]] = field(default_factory=list)
    _stopped: bool = False

    def flush(self, timeout_ms: int = 5000) -> None:
        for provider in (self.tracer_provider, self.meter_provider, self.logger_provider):
            if provider is not None:
                try:
                    provider.force_flush(timeout_ms)
                except Exception:  # telemetry must never break the caller
                    log.debug("telemetry flush failed", exc_info=True)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for hook in self._shutdown_hooks:
            try:
                hook()
            except Exception:
                log.debug("telemetry shutdown hook failed", exc_info=True)
        self.flush()
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
        for provider in (self.tracer_provider, self.meter_provider, self.logger_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:
                    log.debug("telemetry shutdown failed", exc_info=True)


_lock = threading.Lock()
_installed: Telemetry | None = None


def installed() -> Telemetry | None:
    """The telemetry this process set up, or None while telemetry is off."""
    return _installed


def setup(default_service_name: str, *, extra_resource: Mapping[str, Any] | None = None, metrics: bool = True,
          config: TelemetryConfig | None = None) -> Telemetry | None:
    """Install tracer/meter/logger providers and OTLP exporters as the environment asks.

    Returns None, having imported no SDK module and opened nothing, when nothing is configured.
    Idempotent: the first call in a process sets the resource and the tracer provider; a later
    call that asks for metrics (a worker that built a ``FleetClient`` first) adds the meter
    provider that is still missing. ``metrics=False`` skips the meter provider (the producer
    has no metrics of its own).
    """
    global _installed
    config = config or TelemetryConfig.from_env()
    if not config.enabled:
        return None
    require_extra("opentelemetry.sdk", extra="otel",
                  purpose="OpenTelemetry export (an OTEL_EXPORTER_OTLP_* endpoint or FLEET_PROMETHEUS_PORT is set)")
    with _lock:
        if _installed is not None:
            telemetry = _installed
            if metrics and telemetry.meter_provider is None and (config.metrics or config.prometheus_port is not None):
                telemetry.meter_provider = _install_metrics(telemetry, config)
            return telemetry
        telemetry = Telemetry(config=config, resource=build_resource(default_service_name, extra_resource))
        if config.traces:
            telemetry.tracer_provider = _install_traces(telemetry.resource, config.traces)
        if metrics and (config.metrics or config.prometheus_port is not None):
            telemetry.meter_provider = _install_metrics(telemetry, config)
        if config.logs:
            telemetry.logger_provider, telemetry.log_handler = _install_logs(telemetry.resource, config.logs)
        _installed = telemetry
        log.info("telemetry on: service %s, traces %s, metrics %s, logs %s",
                 telemetry.resource.attributes.get("service.name"), _describe(config.traces),
                 _describe(config.metrics) if metrics else "off", _describe(config.logs))
        return telemetry


def shutdown() -> None:
    """Flush and stop whatever :func:`setup` installed (no-op when telemetry is off)."""
    global _installed
    with _lock:
        telemetry, _installed = _installed, None
    if telemetry is not None:
        telemetry.shutdown()


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered now (no-op when telemetry is off)."""
    if _installed is not None:
        _installed.flush(timeout_ms)


def _describe(signal: SignalConfig | None) -> str:
    return f"{signal.protocol} {signal.endpoint}" if signal else "off"


def _install_traces(resource, signal: SignalConfig):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if signal.protocol == PROTOCOL_HTTP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=signal.endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def _install_metrics(telemetry: Telemetry, config: TelemetryConfig):
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    readers = []
    if config.metrics:
        if config.metrics.protocol == PROTOCOL_HTTP:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=config.metrics.endpoint)))
    if config.prometheus_port is not None:
        reader = _prometheus_reader(config.prometheus_port, telemetry)
        if reader is not None:
            readers.append(reader)
    provider = MeterProvider(resource=telemetry.resource, metric_readers=readers)
    metrics.set_meter_provider(provider)
    return provider


def _prometheus_reader(port: int, telemetry: Telemetry):
    """A Prometheus scrape endpoint on ``port`` (needs ``opentelemetry-exporter-prometheus``)."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError:
        log.warning("%s=%s ignored: install opentelemetry-exporter-prometheus for a Prometheus endpoint",
                    PROMETHEUS_PORT_ENV, port)
        return None
    try:
        server, _thread = start_http_server(port)
    except OSError as exc:
        log.warning("no Prometheus endpoint on :%d: %s", port, exc)
        return None
    telemetry._shutdown_hooks.append(server.shutdown)
    log.info("Prometheus metrics on :%d/metrics", port)
    return PrometheusMetricReader()


def _install_logs(resource, signal: SignalConfig):
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    if signal.protocol == PROTOCOL_HTTP:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    provider = LoggerProvider(resource=resource)
    provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(endpoint=signal.endpoint)))
    set_logger_provider(provider)
    handler = LoggingHandler(logger_provider=provider)
    logging.getLogger().addHandler(handler)
    return provider, handler


# --- the producer side ---------------------------------------------------------------------


def setup_producer(default_service_name: str = "fleet-producer") -> Telemetry | None:
    """Trace task publishing (W3C ``traceparent`` into the message headers) when an endpoint is set.

    Called by ``FleetClient.__init__``; cheap and idempotent, and a no-op without an endpoint.
    A failure to set up telemetry is logged and never stops the producer.
    """
    config = TelemetryConfig.from_env()
    if not config.traces:
        return None
    try:
        telemetry = setup(default_service_name, metrics=False, config=config)
        instrument_celery(telemetry)
    except Exception:  # telemetry must never break job submission
        log.exception("telemetry setup failed; continuing without tracing")
        return None
    return telemetry


def instrument_celery(telemetry: Telemetry | None) -> bool:
    """Turn on ``opentelemetry-instrumentation-celery`` once per process (both sides use it)."""
    if telemetry is None or telemetry.tracer_provider is None:
        return False
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=telemetry.tracer_provider,
                                meter_provider=telemetry.meter_provider)
    return True


# --- JSON logs -----------------------------------------------------------------------------

#: LogRecord attributes that are not ``extra=`` fields.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
#: Keys dropped from Celery's structured ``data`` extra: job inputs and results stay out of logs.
_CELERY_DATA_DROPPED = frozenset({"args", "kwargs", "return_value"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, ``trace_id``, ``span_id``, extras.

    ``trace_id``/``span_id`` (W3C hex) come from the span current in the logging thread, so a
    line logged inside a job carries the job's trace; they are absent outside any span.
    ``extra=`` fields are kept, except the job arguments and return value inside Celery's
    ``data`` extra (user inputs and vectors do not belong in logs).
    """

    def __init__(self, static_fields: Mapping[str, Any] | None = None):
        super().__init__()
        self._static = dict(static_fields or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._static,
        }
        trace_id, span_id = current_trace_ids()
        if trace_id:
            entry["trace_id"], entry["span_id"] = trace_id, span_id
        entry["thread"] = record.threadName
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in entry:
                if key == "data" and isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k not in _CELERY_DATA_DROPPED}
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def current_trace_ids() -> tuple[str | None, str | None]:
    """W3C hex ids of the current span, or ``(None, None)`` outside a (sampled or not) span."""
    trace_module = sys.modules.get("opentelemetry.trace")
    if trace_module is None:
        return None, None
    context = trace_module.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def configure_json_logging(level: str | None = None, stream=None) -> logging.Handler:
    """For producer applications: JSON lines on stderr at ``level`` (default ``$FLEET_LOG_LEVEL`` or INFO)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("FLEET_LOG_LEVEL") or "INFO").upper())
    return handler
