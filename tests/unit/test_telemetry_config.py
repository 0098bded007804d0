"""Unit tests: telemetry configuration from the standard environment, resources, JSON logs."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from producer import telemetry
from producer.telemetry import PROTOCOL_GRPC, PROTOCOL_HTTP, JsonFormatter, TelemetryConfig


def test_no_endpoint_means_off():
    config = TelemetryConfig.from_env({})
    assert not config.enabled
    assert config.traces is None and config.metrics is None and config.logs is None


def test_grpc_is_the_default_protocol_and_endpoint_is_used_as_given():
    config = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert config.traces.protocol == PROTOCOL_GRPC and config.traces.endpoint == "http://collector:4317"
    assert config.metrics.endpoint == "http://collector:4317"
    assert config.logs is None  # logs are opt-in (OTEL_LOGS_EXPORTER=otlp)


def test_http_protobuf_appends_the_signal_paths():
    config = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
                                       "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                       "OTEL_LOGS_EXPORTER": "otlp"})
    assert config.traces == telemetry.SignalConfig("http://collector:4318/v1/traces", PROTOCOL_HTTP)
    assert config.metrics.endpoint == "http://collector:4318/v1/metrics"
    assert config.logs.endpoint == "http://collector:4318/v1/logs"


def test_seed_alias_and_standard_name_precedence():
    assert TelemetryConfig.from_env({"OTLP_ENDPOINT": "http://seed:4317"}).traces.endpoint == "http://seed:4317"
    both = TelemetryConfig.from_env({"OTLP_ENDPOINT": "http://seed:4317", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://std:4317"})
    assert both.traces.endpoint == "http://std:4317"


def test_per_signal_overrides_and_switches():
    config = TelemetryConfig.from_env({
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:4318/v1/metrics",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "none",
    })
    assert config.traces is None
    assert config.metrics == telemetry.SignalConfig("http://metrics:4318/v1/metrics", PROTOCOL_HTTP)
    only_traces = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317"})
    assert only_traces.traces.endpoint == "http://t:4317" and only_traces.metrics is None


def test_sdk_disabled_wins():
    config = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true",
                                       "FLEET_PROMETHEUS_PORT": "9464"})
    assert not config.enabled


def test_prometheus_port_alone_enables_metrics_only():
    config = TelemetryConfig.from_env({"FLEET_PROMETHEUS_PORT": "9464"})
    assert config.enabled and config.prometheus_port == 9464 and config.traces is None and config.metrics is None


def test_resource_attributes_and_environment_overrides(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "svc-from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,ml.device=overridden")
    resource = telemetry.build_resource("fleet-worker", {"ml.device": "cpu", "ml.framework.name": "pytorch",
                                                         "absent": None})
    attributes = dict(resource.attributes)
    assert attributes["service.name"] == "svc-from-env"
    assert attributes["deployment.environment"] == "test"
    assert attributes["ml.device"] == "overridden"
    assert attributes["ml.framework.name"] == "pytorch"
    assert "absent" not in attributes
    for key in ("service.version", "service.instance.id", "host.name", "telemetry.sdk.name"):
        assert attributes[key], key


def test_resource_defaults_without_environment(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    attributes = dict(telemetry.build_resource("fleet-producer").attributes)
    assert attributes["service.name"] == "fleet-producer" and attributes["service.namespace"] == "fleet"


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


@pytest.mark.parametrize("value", ["abc", "0", "70000", "-1"])
def test_bad_prometheus_port_is_ignored(value):
    config = TelemetryConfig.from_env({"FLEET_PROMETHEUS_PORT": value})
    assert config.prometheus_port is None and not config.enabled
