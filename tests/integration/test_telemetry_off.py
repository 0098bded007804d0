"""With no endpoint set, telemetry installs nothing and never tries to connect anywhere (and, last, what
one process installs when producer and worker setup both run in it).

Each check runs in a fresh interpreter with every OTEL_*/OTLP_* variable removed and
``socket.socket.connect`` / ``connect_ex`` / ``socket.create_connection`` recording any attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.support.fleet_processes import REPO_ROOT

_PRELUDE = """
import json, socket, sys
attempts = []
_connect, _connect_ex, _create = socket.socket.connect, socket.socket.connect_ex, socket.create_connection
def connect(self, address): attempts.append(repr(address)); return _connect(self, address)
def connect_ex(self, address): attempts.append(repr(address)); return _connect_ex(self, address)
def create_connection(address, *a, **k): attempts.append(repr(address)); return _create(address, *a, **k)
socket.socket.connect, socket.socket.connect_ex, socket.create_connection = connect, connect_ex, create_connection
"""

_REPORT = """
from opentelemetry import metrics, trace
from opentelemetry._logs import get_logger_provider
from celery import signals
report = {
    "attempts": attempts,
    "tracer_provider": type(trace.get_tracer_provider()).__name__,
    "meter_provider": type(metrics.get_meter_provider()).__name__,
    "logger_provider": type(get_logger_provider()).__name__,
    "exporters": sorted(m for m in sys.modules if m.startswith("opentelemetry.exporter")),
    "instrumentation": sorted(m for m in sys.modules if m.startswith("opentelemetry.instrumentation")),
    "sdk_trace": "opentelemetry.sdk.trace" in sys.modules,
    "prerun_receivers": len(signals.task_prerun.receivers),
    "publish_receivers": len(signals.before_task_publish.receivers),
    "torch": "torch" in sys.modules,
}
print("REPORT " + json.dumps(report))
"""


def run_clean(body: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTLP_"))}
    env["FLEET_PROMETHEUS_PORT"] = ""
    code = _PRELUDE + textwrap.dedent(body) + _REPORT
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                               timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    line = next(out for out in completed.stdout.splitlines() if out.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def assert_nothing_installed(report: dict) -> None:
    assert report["attempts"] == [], report
    assert report["tracer_provider"] == "ProxyTracerProvider", report
    assert report["meter_provider"] == "_ProxyMeterProvider", report
    assert report["logger_provider"] == "ProxyLoggerProvider", report
    assert report["exporters"] == [] and report["instrumentation"] == [], report
    assert not report["sdk_trace"], report
    assert report["prerun_receivers"] == 0 and report["publish_receivers"] == 0, report


def test_producer_without_endpoint_installs_nothing_and_connects_nowhere():
    report = run_clean("""
        from producer import FleetClient, telemetry
        client = FleetClient("redis://127.0.0.1:1/0")   # redis-py connects lazily; nothing is sent here
        assert telemetry.setup_producer() is None and telemetry.installed() is None
        telemetry.flush(); telemetry.shutdown()
        client.close()
    """)
    assert_nothing_installed(report)
    assert not report["torch"]


def test_worker_without_endpoint_installs_nothing_and_connects_nowhere():
    report = run_clean("""
        from workers.observability import telemetry
        handle = telemetry.setup_worker("cpu", device_name="CPU")
        assert not handle.enabled and not telemetry.enabled()
        with telemetry.batch_span("minilm", [telemetry.current_span_context()]) as scope:
            scope.record_embedding_norms(None)
        handle.shutdown()
    """)
    assert_nothing_installed(report)


def test_worker_after_a_producer_in_the_same_process_still_gets_metrics():
    """A worker process that built a FleetClient (traces only) before setup_worker keeps its metrics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTLP_"))}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRIC_EXPORT_INTERVAL": "600000",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    code = textwrap.dedent("""
        from opentelemetry import metrics, trace
        from producer import telemetry as base
        from workers.observability import telemetry
        producer_side = base.setup_producer()
        assert producer_side.meter_provider is None
        handle = telemetry.setup_worker("cpu")
        assert handle.telemetry is producer_side and producer_side.meter_provider is not None
        assert type(metrics.get_meter_provider()).__name__ == "MeterProvider"
        assert type(trace.get_tracer_provider()).__name__ == "TracerProvider"
        print("OK")
    """)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                               timeout=120)
    assert completed.returncode == 0 and "OK" in completed.stdout, completed.stdout + completed.stderr
