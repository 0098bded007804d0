"""OpenTelemetry for Fleet processes: the one owner of the SDK set-up, from the standard environment.

Off unless configured. :func:`setup` installs nothing, imports no SDK module and opens no
connection unless the environment asks for telemetry: an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``, the seed's alias ``OTLP_ENDPOINT``, or a per-signal
``OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_ENDPOINT``) or an exporter named in
``OTEL_{TRACES,METRICS,LOGS}_EXPORTER`` (other than ``none``); ``OTEL_SDK_DISABLED=true`` wins
over all of them. Off, the OpenTelemetry API Fleet calls stays the API's own no-op.

On, the SDK configures itself: Fleet runs the SDK's configurator (the one
``opentelemetry-instrument`` runs), so the exporters read ``OTEL_EXPORTER_OTLP_*`` (endpoint,
protocol, headers, timeout, compression, certificates), the sampler reads ``OTEL_TRACES_SAMPLER``
and the readers read ``OTEL_METRIC_EXPORT_INTERVAL`` themselves. Fleet adds three defaults
only: with an OTLP endpoint and no ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``, traces
and metrics go over OTLP (logs stay off unless ``OTEL_LOGS_EXPORTER`` names an exporter); the
seed's ``OTLP_ENDPOINT`` is copied to ``OTEL_EXPORTER_OTLP_ENDPOINT`` when that is unset; and
resource attributes (``service.name``, ``service.namespace``, ``service.version``,
``service.instance.id``, ``host.name``, ``process.pid`` and the caller's) wherever
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` do not set them.
``OTEL_METRICS_EXPORTER=prometheus`` (or ``otlp,prometheus``) turns on Prometheus export.

This module must stay light: the producer imports it, and the producer never imports torch
or worker code.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from typing import IO, Any, Literal

from producer.optional import require_extra

log = logging.getLogger(__name__)

#: The message header that carries the enqueue time (UNIX seconds, float) to the worker.
ENQUEUED_AT_HEADER = "fleet_enqueued_at"

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
#: The seed's name for ``OTEL_EXPORTER_OTLP_ENDPOINT``, accepted as an alias.
ENDPOINT_ALIAS_ENV = "OTLP_ENDPOINT"
#: The OpenTelemetry signals, as the SDK's configurator names them.
Signal = Literal["traces", "metrics", "logs"]
_SIGNALS: tuple[Signal, ...] = ("traces", "metrics", "logs")
_ENDPOINT_VARIABLES = (ENDPOINT_ENV, ENDPOINT_ALIAS_ENV,
                       *(f"OTEL_EXPORTER_OTLP_{s.upper()}_ENDPOINT" for s in _SIGNALS))
#: Signals Fleet sends over OTLP by default once an endpoint is set (logs are opt-in).
_OTLP_BY_DEFAULT = ("traces", "metrics")


class TelemetrySetupError(RuntimeError):
    """The installed OpenTelemetry SDK cannot be configured the way Fleet was written for."""


def enqueue_headers() -> dict[str, float]:
    """Headers the producer adds to every task message (cheap: one clock read)."""
    return {ENQUEUED_AT_HEADER: time.time()}


# --- the gate ------------------------------------------------------------------------------


def _exporter_names(env: Mapping[str, str], signal: str) -> list[str]:
    """The exporters ``OTEL_<SIGNAL>_EXPORTER`` names (``none`` and unset: none)."""
    names = [name.strip() for name in env.get(f"OTEL_{signal.upper()}_EXPORTER", "").split(",") if name.strip()]
    return [] if names == ["none"] else names


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """Does the environment ask for telemetry? (The only notion of "on": see the module docstring.)"""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name) for name in _ENDPOINT_VARIABLES) or any(_exporter_names(env, s) for s in _SIGNALS)


def prometheus_export_on(environ: Mapping[str, str] | None = None) -> bool:
    """Is Prometheus export asked for (``prometheus`` in ``OTEL_METRICS_EXPORTER``)?"""
    env = os.environ if environ is None else environ
    return configured(env) and "prometheus" in _exporter_names(env, "metrics")


def default_exporters(environ: Mapping[str, str] | None = None) -> dict[Signal, list[str]]:
    """Exporters Fleet adds per signal: ``otlp`` for traces and metrics when an endpoint is set and
    the signal's ``OTEL_<SIGNAL>_EXPORTER`` is unset; the SDK adds whatever that variable names."""
    env = os.environ if environ is None else environ
    endpoint = any(env.get(name) for name in _ENDPOINT_VARIABLES)
    return {signal: ["otlp"] if endpoint and signal in _OTLP_BY_DEFAULT
            and not env.get(f"OTEL_{signal.upper()}_EXPORTER") else [] for signal in _SIGNALS}


# --- resource ------------------------------------------------------------------------------


def fleet_version() -> str:
    from producer.version import __version__

    return __version__


def resource_defaults(default_service_name: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fleet's resource attributes, less those ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` set
    (the environment wins; ``None`` values in ``extra`` are dropped)."""
    from opentelemetry.sdk.resources import OTELResourceDetector

    attributes: dict[str, Any] = {
        "service.name": default_service_name,
        "service.namespace": "fleet",
        "service.version": fleet_version(),
        "service.instance.id": str(uuid.uuid4()),
        "host.name": os.environ.get("HOSTNAME") or socket.gethostname(),
        "process.pid": os.getpid(),
        **{k: v for k, v in (extra or {}).items() if v is not None},
    }
    from_environment = OTELResourceDetector().detect().attributes
    return {k: v for k, v in attributes.items() if k not in from_environment}


# --- set-up --------------------------------------------------------------------------------

_lock = threading.Lock()
#: Telemetry is on in this process (Fleet's SDK set-up, or the application's own providers).
_installed = False
#: Fleet installed the providers (so :func:`shutdown` may stop them; an application's it leaves alone).
_fleet_owns_providers = False


def installed() -> bool:
    """Is telemetry on in this process (set up by :func:`setup`, or the application's own providers)?"""
    return _installed


def _configure_sdk(resource_attributes: Mapping[str, Any], exporters: Mapping[Signal, list[str]]) -> None:
    """Run the SDK's configurator (as a distro does) with Fleet's defaults."""
    from opentelemetry.sdk import _configuration
    from opentelemetry.sdk.version import __version__ as sdk_version

    wanted = {"resource_attributes", "trace_exporter_names", "metric_exporter_names", "log_exporter_names"}
    accepted = set(inspect.signature(_configuration._initialize_components).parameters)
    if not wanted <= accepted or not hasattr(_configuration, "_get_exporter_entry_point"):
        raise TelemetrySetupError(f"opentelemetry-sdk {sdk_version}: its configurator is not the one Fleet "
                                  f"was written for (1.45: {', '.join(sorted(wanted))}, _get_exporter_entry_point)")

    class FleetConfigurator(_configuration._OTelSDKConfigurator):
        """Fleet as an OpenTelemetry distro: the SDK's own configuration, Fleet's defaults."""

    # Names given here skip the SDK's OTEL_EXPORTER_OTLP_*_PROTOCOL lookup; resolve "otlp" as it would.
    entry_points = {signal: [_configuration._get_exporter_entry_point(name, signal) for name in names]
                    for signal, names in exporters.items()}
    # opentelemetry-sdk leaves _BaseConfigurator.__new__ and configure() unannotated.
    FleetConfigurator().configure(resource_attributes=dict(resource_attributes),  # type: ignore[no-untyped-call]
                                  trace_exporter_names=entry_points["traces"],
                                  metric_exporter_names=entry_points["metrics"],
                                  log_exporter_names=entry_points["logs"])


def setup(default_service_name: str, *, resource_attributes: Mapping[str, Any] | None = None) -> bool:
    """Install the SDK (tracer, meter and logger providers, exporters) as the environment asks.

    Returns whether telemetry is on in this process. Does nothing when the environment asks
    for none (see :func:`configured`), and installs at most once per process: the first call
    sets the resource. An application that installed its own tracer provider keeps it (Fleet
    then only instruments Celery). Raises ``TelemetrySetupError`` on an SDK Fleet cannot drive.
    """
    global _installed, _fleet_owns_providers
    if not configured():
        return False
    require_extra("opentelemetry.sdk", extra="otel", purpose="telemetry export (OTEL_* is set)")
    with _lock:
        if _installed:
            return True
        from opentelemetry import trace

        if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
            log.info("telemetry: keeping the application's own OpenTelemetry providers")
            _installed = True
            return True
        if os.environ.get(ENDPOINT_ALIAS_ENV) and not os.environ.get(ENDPOINT_ENV):
            os.environ[ENDPOINT_ENV] = os.environ[ENDPOINT_ALIAS_ENV]
        if prometheus_export_on():
            # The SDK's Prometheus reader opens a listener of its own (localhost:9464 by default; two
            # workers on one host would collide). Fleet serves the same registry on its probe port
            # (/metrics), so unless told otherwise let the SDK's go to a free localhost port.
            os.environ.setdefault("OTEL_EXPORTER_PROMETHEUS_PORT", "0")
        exporters = default_exporters()
        _configure_sdk(resource_defaults(default_service_name, resource_attributes), exporters)
        _installed = _fleet_owns_providers = True
        log.info("telemetry on: service %s; exporters (besides OTEL_*_EXPORTER) %s", default_service_name, exporters)
        return True


def _providers() -> list[Any]:
    from opentelemetry import metrics, trace
    from opentelemetry._logs import get_logger_provider

    return [trace.get_tracer_provider(), metrics.get_meter_provider(), get_logger_provider()]


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered now (no-op when telemetry is off)."""
    if not _installed:
        return
    for provider in _providers():
        try:
            getattr(provider, "force_flush", lambda _timeout: None)(timeout_ms)
        except Exception:
            log.debug("telemetry flush failed", exc_info=True)


def shutdown() -> None:
    """Flush and stop what :func:`setup` installed (no-op when telemetry is off or the providers are
    the application's; safe twice)."""
    global _installed, _fleet_owns_providers
    with _lock:
        owned, _installed, _fleet_owns_providers = _fleet_owns_providers, False, False
    if not owned:
        return
    for provider in _providers():
        try:
            getattr(provider, "shutdown", lambda: None)()
        except Exception:
            log.debug("telemetry shutdown failed", exc_info=True)


# --- the producer side ---------------------------------------------------------------------


def setup_producer(default_service_name: str = "fleet-producer") -> bool:
    """Trace task publishing (W3C ``traceparent`` into the message headers) when telemetry is configured.

    Called by ``FleetClient.__init__``; cheap and idempotent, and a no-op unless configured.
    A failure to set up telemetry is logged and never stops the producer.
    """
    if not configured():
        return False
    try:
        setup(default_service_name)
        instrument_celery()
    except Exception:
        log.exception("telemetry setup failed; continuing without tracing")
        return False
    return True


def instrument_celery() -> None:
    """Turn on ``opentelemetry-instrumentation-celery`` once per process (both sides use it)."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


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


def configure_json_logging(level: str | None = None, stream: IO[str] | None = None) -> logging.Handler:
    """For producer applications: JSON lines on stderr at ``level`` (default ``$FLEET_LOG_LEVEL`` or INFO)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("FLEET_LOG_LEVEL") or "INFO").upper())
    return handler
