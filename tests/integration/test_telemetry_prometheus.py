"""The optional Prometheus endpoint (``FLEET_PROMETHEUS_PORT``) serves the worker's metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.support.fleet_processes import REPO_ROOT
from workers.process.embedded_redis import free_port

pytest.importorskip("opentelemetry.exporter.prometheus", reason="opentelemetry-exporter-prometheus not installed")


def test_prometheus_endpoint_serves_ml_metrics():
    port = free_port()
    code = textwrap.dedent(f"""
        import time, urllib.request
        from types import SimpleNamespace
        from opentelemetry import trace
        from workers.observability import telemetry
        handle = telemetry.setup_worker("cpu")
        assert handle.enabled and telemetry.enabled()
        assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"  # metrics only
        task = SimpleNamespace(name="fleet.embed", request=SimpleNamespace(
            fleet_enqueued_at=time.time() - 0.5, delivery_info={{"routing_key": "fleet.embed.minilm"}}))
        telemetry._on_prerun(task_id="j1", task=task, args=({{"model": "minilm"}},))
        telemetry._on_postrun(task_id="j1", task=task, retval={{}}, state="SUCCESS")
        with telemetry.batch_span("minilm", [None], enqueued_at=(time.monotonic(),)):
            pass
        print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
        handle.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTLP_"))}
    env["FLEET_PROMETHEUS_PORT"] = str(port)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                               timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    scraped = completed.stdout
    (count,) = [line for line in scraped.splitlines() if line.startswith("ml_inference_count_total{")]
    for label in ('device="cpu"', 'kind="embed"', 'model="minilm"', 'outcome="success"'):
        assert label in count, count
    assert count.endswith(" 1.0"), count
    assert "ml_queue_wait_seconds_count" in scraped and "ml_batch_size_count" in scraped
    assert "ml_device_memory_bytes" in scraped
