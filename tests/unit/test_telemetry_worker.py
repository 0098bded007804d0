"""Unit tests of the worker's instruments with in-memory exporters (no network, no Celery worker).

The end-to-end proof over a real OTLP receiver is tests/integration/test_observability_e2e.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from producer.errors import JobFailedError
from workers.observability import telemetry


@pytest.fixture()
def otel():
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.install(tracer_provider=tracer_provider, meter_provider=meter_provider, device="cpu",
                      models={"minilm": "embed"})
    yield SimpleNamespace(spans=spans, reader=reader, tracer=tracer_provider.get_tracer("test"))
    telemetry.uninstall()
    tracer_provider.shutdown()
    meter_provider.shutdown()


def points(reader, name):
    data = reader.get_metrics_data()
    found = []
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == name:
                    found.extend((metric.unit, dict(p.attributes), p) for p in metric.data.data_points)
    return found


def finished(spans, name):
    return [s for s in spans.get_finished_spans() if s.name == name]


def test_helpers_are_noops_when_off():
    telemetry.uninstall()
    assert telemetry.current_span_context() is None
    for scope in (telemetry.tokenize_span("m", 1), telemetry.batch_span("m", [None]),
                  telemetry.forward_span("m", "embed", "cpu", torch.float32, (2, 3)), telemetry.epoch_span("m", 1)):
        assert scope is telemetry.NOOP
        with scope as handle:
            handle.record_tokens([[1, 2]])
            handle.record_embedding_norms(torch.ones(2, 3))
            handle.record(loss=1.0, accuracy=0.5)
            handle.set(a=1)
    telemetry.record_accuracy("m", "d", 0.5)
    telemetry.record_training_loss("m", 0.1)


def test_batch_span_links_every_job_and_parents_on_the_first(otel):
    job_contexts = []
    for _ in range(3):
        with otel.tracer.start_as_current_span("run/fleet.embed", kind=SpanKind.CONSUMER):
            with telemetry.tokenize_span("minilm", 2) as tok:
                tok.record_tokens([[101, 7, 102], [101, 102]])
            job_contexts.append(telemetry.current_span_context())
    now = time.monotonic()
    with telemetry.batch_span("minilm", job_contexts + [None], enqueued_at=(now - 0.004, now - 0.002, now)):
        with telemetry.forward_span("minilm", "embed", "cpu", torch.float32, torch.Size([3, 12])) as forward:
            forward.record_embedding_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]))

    (batch,) = finished(otel.spans, "fleet.batch")
    assert batch.parent.span_id == job_contexts[0].span_id and batch.context.trace_id == job_contexts[0].trace_id
    assert {link.context.span_id for link in batch.links} == {c.span_id for c in job_contexts}
    assert batch.attributes["ml.batch.size"] == 3 and batch.attributes["fleet.batch.jobs"] == 3
    assert batch.attributes["fleet.batch.oldest_wait_s"] >= 0.004
    (fwd,) = finished(otel.spans, "fleet.forward")
    assert fwd.parent.span_id == batch.context.span_id
    assert fwd.attributes["ml.model.name"] == "minilm" and fwd.attributes["ml.model.kind"] == "embed"
    assert fwd.attributes["ml.device"] == "cpu" and fwd.attributes["ml.dtype"] == "float32"
    assert tuple(fwd.attributes["ml.input.shape"]) == (3, 12)
    assert fwd.attributes["ml.batch.size"] == 3 and fwd.attributes["ml.seq_len"] == 12
    assert fwd.attributes["ml.output.norm.min"] == pytest.approx(1.0)
    assert fwd.attributes["ml.output.norm.max"] == pytest.approx(10.0)
    assert fwd.attributes["ml.output.norm.mean"] == pytest.approx(16 / 3)
    tokenize = finished(otel.spans, "fleet.tokenize")
    assert len(tokenize) == 3 and tokenize[0].attributes["ml.tokens.total"] == 5
    assert tokenize[0].attributes["ml.tokens.max"] == 3

    ((unit, attributes, point),) = points(otel.reader, "ml.batch.size")
    assert attributes == {"model": "minilm", "kind": "embed", "device": "cpu"} and point.sum == 3
    ((unit, attributes, point),) = points(otel.reader, "ml.forward.duration")
    assert unit == "s" and point.count == 1 and 0 < point.sum < 10


def test_batch_without_job_context_is_a_root_span(otel):
    with telemetry.batch_span("minilm", [None, None]):
        pass
    (batch,) = finished(otel.spans, "fleet.batch")
    assert batch.parent is None and not batch.links and batch.attributes["ml.batch.size"] == 0


def test_a_failing_batch_span_records_the_error(otel):
    with pytest.raises(RuntimeError):
        with telemetry.batch_span("minilm", []):
            raise RuntimeError("CUDA out of memory")
    (batch,) = finished(otel.spans, "fleet.batch")
    assert not batch.status.is_ok and batch.events[0].name == "exception"


def fake_task(task_id: str, enqueued_at: float | None, name: str = "fleet.embed"):
    request = SimpleNamespace(id=task_id, delivery_info={"routing_key": "fleet.embed.minilm"}, headers=None)
    if enqueued_at is not None:
        request.fleet_enqueued_at = enqueued_at
    return SimpleNamespace(name=name, request=request)


def test_job_signals_record_queue_wait_outcomes_and_back_links(otel):
    ok_task = fake_task("job-ok", time.time() - 2.0)
    with otel.tracer.start_as_current_span("run/fleet.embed", kind=SpanKind.CONSUMER):
        telemetry._on_prerun(task_id="job-ok", task=ok_task, args=({"texts": ["a"], "model": "minilm"},))
        job_context = telemetry.current_span_context()
        with telemetry.batch_span("minilm", [job_context]):
            pass
        telemetry._on_postrun(task_id="job-ok", task=ok_task, retval={"vectors": []}, state="SUCCESS")
    bad_task = fake_task("job-bad", None)
    with otel.tracer.start_as_current_span("run/fleet.embed", kind=SpanKind.CONSUMER):
        telemetry._on_prerun(task_id="job-bad", task=bad_task, args=({"texts": [], "model": "nonsense"},))
        telemetry._on_postrun(task_id="job-bad", task=bad_task, retval=JobFailedError("invalid_input", "bad"),
                              state="FAILURE")

    run_ok, run_bad = finished(otel.spans, "run/fleet.embed")
    (batch,) = finished(otel.spans, "fleet.batch")
    assert [link.context.span_id for link in run_ok.links] == [batch.context.span_id]
    assert run_ok.attributes["fleet.outcome"] == "success" and run_ok.attributes["fleet.queue_wait_s"] >= 2.0
    assert run_ok.attributes["fleet.job.id"] == "job-ok" and run_ok.attributes["ml.model.name"] == "minilm"
    assert run_bad.attributes["fleet.outcome"] == "invalid_input" and not run_bad.status.is_ok
    assert run_bad.attributes["ml.model.name"] == "minilm"  # unknown payload model: the queue's model
    (wait,) = finished(otel.spans, "fleet.queue_wait")
    assert (wait.end_time - wait.start_time) / 1e9 == pytest.approx(2.0, abs=0.5)
    assert wait.attributes["messaging.destination.name"] == "fleet.embed.minilm"

    counts = {p[1]["outcome"]: p[2].value for p in points(otel.reader, "ml.inference.count")}
    assert counts == {"success": 1, "invalid_input": 1}
    for unit, attributes, _ in points(otel.reader, "ml.inference.count"):
        assert unit == "{job}" and attributes["model"] == "minilm" and attributes["kind"] == "embed"
        assert attributes["device"] == "cpu"
    durations = points(otel.reader, "ml.inference.duration")
    assert {p[0] for p in durations} == {"s"} and sum(p[2].count for p in durations) == 2
    ((unit, attributes, wait_point),) = points(otel.reader, "ml.queue.wait")
    assert unit == "s" and wait_point.count == 1 and 1.5 < wait_point.sum < 5
    ((unit, attributes, in_flight),) = points(otel.reader, "ml.jobs.in_flight")
    assert in_flight.value == 0 and attributes == {"kind": "embed", "device": "cpu"}


def test_outcome_names():
    assert telemetry.job_outcome("SUCCESS", 1) == "success"
    assert telemetry.job_outcome("FAILURE", JobFailedError("out_of_memory", "oom")) == "out_of_memory"
    assert telemetry.job_outcome("FAILURE", ValueError("x")) == "internal"
    assert telemetry.job_outcome("IGNORED", None) == "cancelled"
    assert telemetry.job_outcome("RETRY", None) == "retry"


def test_training_helpers_record_loss_and_accuracy(otel):
    for epoch, (loss, accuracy) in enumerate([(1.2, 0.5), (0.4, 0.9)], start=1):
        with telemetry.epoch_span("digits-mlp", epoch, epochs=2, dataset="digits") as scope:
            scope.record(loss=loss, accuracy=accuracy)
    telemetry.record_accuracy("digits-mlp", "digits-test", 0.88)
    epochs = finished(otel.spans, "fleet.train.epoch")
    assert [s.attributes["ml.training.epoch"] for s in epochs] == [1, 2]
    assert epochs[1].attributes["ml.training.loss"] == pytest.approx(0.4)
    assert epochs[1].attributes["ml.model.accuracy"] == pytest.approx(0.9)
    accuracy = {p[1]["dataset"]: p[2].value for p in points(otel.reader, "ml.model.accuracy")}
    assert accuracy == {"digits": pytest.approx(0.9), "digits-test": pytest.approx(0.88)}
    ((unit, attributes, loss_point),) = points(otel.reader, "ml.training.loss")
    assert loss_point.value == pytest.approx(0.4) and attributes == {"model": "digits-mlp", "dataset": "digits"}


def test_device_memory_is_observed(otel):
    ((unit, attributes, point),) = points(otel.reader, "ml.device.memory")
    assert unit == "By" and attributes == {"device": "cpu", "type": "rss"} and point.value > 10 * 2**20


def test_enqueued_at_header_forms():
    assert telemetry.enqueued_at(SimpleNamespace(fleet_enqueued_at="12.5")) == 12.5
    assert telemetry.enqueued_at(SimpleNamespace(headers={"fleet_enqueued_at": 3})) == 3.0
    assert telemetry.enqueued_at(SimpleNamespace(headers=None)) is None
    assert telemetry.enqueued_at(SimpleNamespace(fleet_enqueued_at="garbage")) is None
