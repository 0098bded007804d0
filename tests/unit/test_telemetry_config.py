"""Unit tests: telemetry configuration from the standard environment, resources, JSON logs."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from producer import telemetry
from producer.telemetry import JsonFormatter


def test_nothing_set_means_off():
    assert not telemetry.configured({})
    assert telemetry.default_exporters({}) == {"traces": [], "metrics": [], "logs": []}


def test_an_endpoint_turns_on_otlp_traces_and_metrics_but_not_logs():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert telemetry.configured(env)
    assert telemetry.default_exporters(env) == {"traces": ["otlp"], "metrics": ["otlp"], "logs": []}


def test_seed_alias_and_per_signal_endpoints_turn_it_on():
    assert telemetry.configured({"OTLP_ENDPOINT": "http://seed:4317"})
    only_traces = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces"}
    assert telemetry.configured(only_traces)
    assert telemetry.default_exporters(only_traces)["traces"] == ["otlp"]


def test_an_exporter_variable_leaves_the_choice_to_the_sdk():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none",
           "OTEL_METRICS_EXPORTER": "otlp,prometheus"}
    assert telemetry.default_exporters(env) == {"traces": [], "metrics": [], "logs": []}
    assert telemetry.prometheus_export_on(env)
    prometheus_only = {"OTEL_METRICS_EXPORTER": "prometheus"}
    assert telemetry.configured(prometheus_only) and telemetry.prometheus_export_on(prometheus_only)
    assert not telemetry.configured({"OTEL_TRACES_EXPORTER": "none"})


def test_sdk_disabled_wins():
    assert not telemetry.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true",
                                     "OTEL_METRICS_EXPORTER": "prometheus"})


def test_the_environment_wins_over_fleets_resource_defaults(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "svc-from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,ml.device=overridden")
    defaults = telemetry.resource_defaults("fleet-worker", {"ml.device": "cpu", "ml.framework.name": "pytorch",
                                                            "absent": None})
    assert "service.name" not in defaults and "ml.device" not in defaults and "absent" not in defaults
    assert defaults["ml.framework.name"] == "pytorch"
    for key in ("service.version", "service.instance.id", "host.name", "service.namespace"):
        assert defaults[key], key


def test_resource_defaults_without_environment(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    defaults = telemetry.resource_defaults("fleet-producer")
    assert defaults["service.name"] == "fleet-producer" and defaults["service.namespace"] == "fleet"


def test_enqueue_header_is_unix_seconds():
    headers = telemetry.enqueue_headers()
    assert set(headers) == {telemetry.ENQUEUED_AT_HEADER}
    assert abs(headers[telemetry.ENQUEUED_AT_HEADER] - time.time()) < 1.0


def _log_line(logger_name: str, emit) -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_json_log_line_outside_a_span_has_no_trace_ids():
    entry = _log_line("fleet.test.plain", lambda logger: logger.warning("hello %s", "world", extra={"job_id": "j1"}))
    assert entry["message"] == "hello world" and entry["level"] == "WARNING" and entry["logger"] == "fleet.test.plain"
    assert entry["job_id"] == "j1" and entry["ts"].endswith("Z")
    assert "trace_id" not in entry and "span_id" not in entry


def test_json_log_line_inside_a_span_carries_its_ids():
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("job") as span:
        context = span.get_span_context()
        entry = _log_line("fleet.test.traced", lambda logger: logger.info("inside"))
    assert entry["trace_id"] == f"{context.trace_id:032x}"
    assert entry["span_id"] == f"{context.span_id:016x}"


def test_json_log_line_with_exception():
    def emit(logger):
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")

    entry = _log_line("fleet.test.exc", emit)
    assert entry["level"] == "ERROR" and "ValueError: boom" in entry["exception"]


@pytest.mark.parametrize("env_value, tty, expected", [
    ("json", True, "json"), ("text", False, "text"), ("", True, "text"), ("", False, "json"), ("auto", False, "json"),
])
def test_worker_log_format_from_environment(monkeypatch, env_value, tty, expected):
    from workers.observability.logs import resolve_format

    monkeypatch.setenv("FLEET_LOG_FORMAT", env_value)

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert resolve_format(None, Stream()) == expected


def test_json_log_line_drops_job_inputs_from_celery_data():
    data = {"id": "j1", "name": "fleet.embed", "args": "[{'texts': ['secret']}]", "kwargs": "{}",
            "return_value": "{'vectors': [...]}", "runtime": 0.2}
    entry = _log_line("fleet.test.celery", lambda logger: logger.info("Task done", extra={"data": data}))
    assert entry["data"] == {"id": "j1", "name": "fleet.embed", "runtime": 0.2}
