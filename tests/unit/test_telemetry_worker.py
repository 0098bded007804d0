"""Unit tests of the worker's spans and metrics with in-memory exporters (no network, no Celery worker).

The global OpenTelemetry providers are set once for this module (the API allows one per process):
the worker's instruments, created on the API's proxy meter at import, start recording then.
Values are cumulative, so each test uses a model name of its own.
The end-to-end proof over a real OTLP receiver is tests/integration/test_observability_e2e.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from producer.errors import JobFailedError  # noqa: E402
from workers.observability import telemetry  # noqa: E402
from workers.serving.batching import BatchInfo  # noqa: E402


@pytest.fixture(scope="module")
def otel():
    if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
        pytest.skip("another test installed global OpenTelemetry providers in this process")
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return SimpleNamespace(spans=spans, reader=reader, tracer=tracer_provider.get_tracer("test"))


@pytest.fixture()
def fresh(otel):
    otel.spans.clear()
    return otel


def points(reader, name, model=None):
    data = reader.get_metrics_data()
    found = []
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == name:
                    found.extend((metric.unit, dict(p.attributes), p) for p in metric.data.data_points
                                 if model is None or p.attributes.get("ml.model.name") == model)
    return found


def finished(spans, name):
    return [s for s in spans.get_finished_spans() if s.name == name]


def test_spans_are_the_apis_no_ops_before_any_sdk():
    """Run first (file order): nothing installed yet, the helpers record nothing and cost no SDK."""
    if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
        pytest.skip("providers already installed in this process")
    assert not telemetry.current_span().get_span_context().is_valid
    with telemetry.tokenize_span("m", "embed", 1) as span:
        telemetry.record_tokens(span, [[1, 2]])
        assert not span.is_recording()
    with telemetry.BatchScope("cpu")("m", BatchInfo((time.monotonic(),), contexts=(None,))) as span:
        telemetry.record_embedding_norms(span, torch.ones(2, 3))


def test_batch_span_links_every_job_both_ways_and_parents_on_the_first(fresh):
    jobs = []
    for _ in range(3):
        run = fresh.tracer.start_span("run/fleet.embed", kind=SpanKind.CONSUMER)
        with trace.use_span(run, end_on_exit=False):
            with telemetry.tokenize_span("m-batch", "embed", 2) as tok:
                telemetry.record_tokens(tok, [[101, 7, 102], [101, 102]])
            jobs.append(telemetry.current_span())
    # The jobs' run/ spans are still open while their items are batched (they wait on futures).
    now = time.monotonic()
    scope = telemetry.BatchScope("cpu", {"m-batch": "embed"})
    with scope("m-batch", BatchInfo((now - 0.004, now - 0.002, now, now), contexts=(*jobs, None))):
        with telemetry.forward_span("m-batch", "embed", "cpu", torch.float32, torch.Size([4, 12])) as forward:
            telemetry.record_embedding_norms(forward, torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]))
    for job in jobs:
        job.end()

    (batch,) = finished(fresh.spans, "fleet.batch")
    contexts = [job.get_span_context() for job in jobs]
    assert batch.parent.span_id == contexts[0].span_id and batch.context.trace_id == contexts[0].trace_id
    assert {link.context.span_id for link in batch.links} == {c.span_id for c in contexts}
    for run in finished(fresh.spans, "run/fleet.embed"):
        assert [link.context.span_id for link in run.links] == [batch.context.span_id]
    assert batch.attributes["ml.batch.size"] == 4 and batch.attributes["fleet.batch.jobs"] == 3
    assert batch.attributes["ml.model.kind"] == "embed" and batch.attributes["fleet.batch.oldest_wait_s"] >= 0.004
    (fwd,) = finished(fresh.spans, "fleet.forward")
    assert fwd.parent.span_id == batch.context.span_id
    assert fwd.attributes["ml.model.name"] == "m-batch" and fwd.attributes["ml.dtype"] == "float32"
    assert tuple(fwd.attributes["ml.input.shape"]) == (4, 12) and fwd.attributes["ml.seq_len"] == 12
    assert fwd.attributes["ml.output.norm.min"] == pytest.approx(1.0)
    assert fwd.attributes["ml.output.norm.mean"] == pytest.approx(16 / 3)
    tokenize = finished(fresh.spans, "fleet.tokenize")
    assert len(tokenize) == 3 and tokenize[0].attributes["ml.tokens.total"] == 5

    ((unit, attributes, point),) = points(fresh.reader, "fleet.batch.size", "m-batch")
    assert unit == "{item}" and point.sum == 4
    assert attributes == {"ml.model.name": "m-batch", "ml.model.kind": "embed", "ml.device": "cpu"}
    ((unit, _, point),) = points(fresh.reader, "fleet.forward.duration", "m-batch")
    assert unit == "s" and point.count == 1


def test_a_failing_batch_span_records_the_error(fresh):
    with pytest.raises(RuntimeError):
        with telemetry.BatchScope("cpu")("m-fail", BatchInfo(())):
            raise RuntimeError("CUDA out of memory")
    (batch,) = finished(fresh.spans, "fleet.batch")
    assert not batch.status.is_ok and batch.events[0].name == "exception" and batch.parent is None


def fake_task(task_id: str, enqueued_at: float | None, name: str = "fleet.embed"):
    request = SimpleNamespace(id=task_id, delivery_info={"routing_key": "fleet.embed.m-jobs"}, headers=None)
    if enqueued_at is not None:
        request.fleet_enqueued_at = enqueued_at
    return SimpleNamespace(name=name, request=request)


def test_job_signals_record_queue_wait_duration_and_error_type(fresh):
    signals = telemetry.JobSignals("cpu", {"m-jobs": "embed"})
    ok_task = fake_task("job-ok", time.time() - 2.0)
    with fresh.tracer.start_as_current_span("run/fleet.embed", kind=SpanKind.CONSUMER):
        signals.on_prerun(task_id="job-ok", task=ok_task, args=({"texts": ["a"], "model": "m-jobs"},))
        signals.on_postrun(task_id="job-ok", task=ok_task, retval={"vectors": []}, state="SUCCESS")
    bad_task = fake_task("job-bad", None)
    with fresh.tracer.start_as_current_span("run/fleet.embed", kind=SpanKind.CONSUMER):
        signals.on_prerun(task_id="job-bad", task=bad_task, args=({"texts": [], "model": "nonsense"},))
        signals.on_postrun(task_id="job-bad", task=bad_task, retval=JobFailedError("invalid_input", "bad"),
                           state="FAILURE")

    run_ok, run_bad = finished(fresh.spans, "run/fleet.embed")
    assert "error.type" not in run_ok.attributes and run_ok.attributes["fleet.queue_wait_s"] >= 2.0
    assert run_ok.attributes["fleet.job.id"] == "job-ok" and run_ok.attributes["ml.model.name"] == "m-jobs"
    assert run_bad.attributes["error.type"] == "invalid_input" and not run_bad.status.is_ok
    assert run_bad.attributes["ml.model.name"] == "m-jobs"  # unknown payload model: the queue's model
    (wait,) = finished(fresh.spans, "fleet.queue_wait")
    assert (wait.end_time - wait.start_time) / 1e9 == pytest.approx(2.0, abs=0.5)
    assert wait.attributes["messaging.destination.name"] == "fleet.embed.m-jobs"

    durations = {p[1].get("error.type"): p[2] for p in points(fresh.reader, "fleet.job.duration", "m-jobs")}
    assert set(durations) == {None, "invalid_input"} and all(p.count == 1 for p in durations.values())
    assert {p[0] for p in points(fresh.reader, "fleet.job.duration", "m-jobs")} == {"s"}
    ((unit, attributes, wait_point),) = points(fresh.reader, "fleet.queue.wait", "m-jobs")
    assert unit == "s" and wait_point.count == 1 and 1.5 < wait_point.sum < 5
    assert attributes == {"ml.model.name": "m-jobs", "ml.model.kind": "embed"}
    in_flight = [p for p in points(fresh.reader, "fleet.jobs.in_flight") if p[1]["ml.model.kind"] == "embed"]
    assert [p[2].value for p in in_flight] == [0]


def test_error_types():
    assert telemetry.error_type("SUCCESS", 1) is None
    assert telemetry.error_type("FAILURE", JobFailedError("out_of_memory", "oom")) == "out_of_memory"
    assert telemetry.error_type("FAILURE", ValueError("x")) == "internal"
    assert telemetry.error_type("IGNORED", None) == "cancelled"
    assert telemetry.error_type("RETRY", None) == "retry"


def test_training_and_generation_recording_apis(fresh):
    progress = SimpleNamespace(step=30, total_steps=120, loss=0.75)
    telemetry.record_training_progress("digits-mlp", "mlp", progress)
    telemetry.record_model_accuracy("digits-mlp", "mlp", 0.93)
    ((_, attributes, point),) = points(fresh.reader, "fleet.training.progress", "digits-mlp")
    assert point.value == pytest.approx(0.25) and attributes["fleet.training.kind"] == "mlp"
    ((_, _, point),) = points(fresh.reader, "fleet.training.loss", "digits-mlp")
    assert point.value == pytest.approx(0.75)
    ((_, _, point),) = points(fresh.reader, "fleet.model.accuracy", "digits-mlp")
    assert point.value == pytest.approx(0.93)

    telemetry.record_generation("tiny-llama", time_to_first_token_s=0.2, output_tokens=11, duration_s=1.2)
    telemetry.record_generation("tiny-llama", time_to_first_token_s=0.1, output_tokens=1, duration_s=0.1)
    ((unit, attributes, ttft),) = points(fresh.reader, "gen_ai.server.time_to_first_token", "tiny-llama")
    assert unit == "s" and ttft.count == 2 and ttft.sum == pytest.approx(0.3)
    assert attributes["gen_ai.request.model"] == "tiny-llama" and attributes["gen_ai.operation.name"]
    ((_, _, per_token),) = points(fresh.reader, "gen_ai.server.time_per_output_token", "tiny-llama")
    assert per_token.count == 1 and per_token.sum == pytest.approx(0.1)  # (1.2 - 0.2) / 10


def test_memory_is_observed_as_its_own_metric(fresh):
    telemetry.register_observers("cpu", ["m-obs"], ready=lambda: True)
    ((unit, attributes, point),) = points(fresh.reader, "process.memory.usage")
    assert unit == "By" and attributes == {} and point.value > 10 * 2**20
    assert not points(fresh.reader, "fleet.cuda.memory.allocated")
    ((_, attributes, point),) = points(fresh.reader, "fleet.worker.ready", "m-obs")
    assert point.value == 1


def test_enqueued_at_header_forms():
    assert telemetry.enqueued_at(SimpleNamespace(fleet_enqueued_at="12.5")) == 12.5
    assert telemetry.enqueued_at(SimpleNamespace(headers={"fleet_enqueued_at": 3})) == 3.0
    assert telemetry.enqueued_at(SimpleNamespace(headers=None)) is None
    assert telemetry.enqueued_at(SimpleNamespace(fleet_enqueued_at="garbage")) is None


def test_instruments_annotations_name_exactly_the_table_rows():
    """``Instruments`` creates its attributes from ``HISTOGRAMS`` and ``GAUGES``; its annotations (what mypy
    checks callers against) must name the same attributes, no more, no fewer."""
    from workers.observability.instruments import GAUGES, HISTOGRAMS, Instruments

    created = {row[0] for row in HISTOGRAMS} | {row[0] for row in GAUGES} | {"jobs_in_flight"}
    assert set(Instruments.__annotations__) == created
