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
        assert telemetry.setup_producer() is False and not telemetry.installed()
        telemetry.flush(); telemetry.shutdown()
        client.close()
    """)
    assert_nothing_installed(report)
    assert not report["torch"]


def test_worker_without_endpoint_installs_nothing_and_connects_nowhere():
    report = run_clean("""
        import time
        from producer import telemetry as base
        from workers.observability import telemetry
        from workers.serving.batching import BatchInfo
        handle = telemetry.setup_worker("cpu", models={"minilm": "embed"}, device_name="CPU", ready=lambda: True)
        assert handle.signals is None and not base.installed()
        info = BatchInfo((time.monotonic(),), contexts=(telemetry.current_span(),))
        with telemetry.BatchScope("cpu")("minilm", info) as span:
            telemetry.record_embedding_norms(span, None)  # not recording: the tensor is never touched
        handle.shutdown()
    """)
    assert_nothing_installed(report)


def test_one_setup_per_process_serves_producer_and_worker_alike():
    """A worker process that built a FleetClient first: the first setup installs traces and metrics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTLP_"))}
    env.update({"OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRIC_EXPORT_INTERVAL": "600000",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    code = textwrap.dedent("""
        import os
        from opentelemetry import metrics, trace
        from producer import telemetry as base
        from workers.observability import telemetry
        assert base.setup_producer() is True
        assert os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:9"  # the seed's alias, copied
        handle = telemetry.setup_worker("cpu", models={"minilm": "embed"})
        assert handle.signals is not None and base.installed()
        assert type(metrics.get_meter_provider()).__name__ == "MeterProvider"
        assert type(trace.get_tracer_provider()).__name__ == "TracerProvider"
        exporter = trace.get_tracer_provider()._active_span_processor._span_processors[0].span_exporter
        assert type(exporter).__module__.endswith("grpc.trace_exporter"), type(exporter)  # the SDK's default
        print("OK")
    """)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                               timeout=120)
    assert completed.returncode == 0 and "OK" in completed.stdout, completed.stdout + completed.stderr


def test_an_applications_own_providers_are_kept_and_never_shut_down():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTLP_"))}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    code = textwrap.dedent("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from producer import telemetry
        spans = InMemorySpanExporter()
        own = TracerProvider()
        own.add_span_processor(SimpleSpanProcessor(spans))
        trace.set_tracer_provider(own)
        assert telemetry.setup_producer() is True and telemetry.installed()
        assert trace.get_tracer_provider() is own
        telemetry.shutdown()
        with trace.get_tracer("app").start_as_current_span("after-fleet-shutdown"):
            pass
        assert [s.name for s in spans.get_finished_spans()] == ["after-fleet-shutdown"], spans.get_finished_spans()
        print("OK")
    """)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                               timeout=120)
    assert completed.returncode == 0 and "OK" in completed.stdout, completed.stdout + completed.stderr
