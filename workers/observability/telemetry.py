"""Worker-side telemetry: job spans and metrics, batch and forward-pass spans, training helpers.

``setup_worker`` runs once in ``fleet worker`` after the models are loaded and before the
consumer starts (threads pool: no fork follows, so this is the right moment). With no
endpoint configured it installs nothing and every helper below is a no-op costing one
global lookup.

What it records (docs/OBSERVABILITY.md has the span tree and the metric table):

* per job, from Celery's ``task_prerun``/``task_postrun`` signals (no code in the tasks):
  a ``fleet.queue_wait`` span from the ``fleet_enqueued_at`` header to the start of the job,
  ``ml.queue.wait``, ``ml.jobs.in_flight``, ``ml.inference.count`` (with ``outcome``) and
  ``ml.inference.duration``; the ``run/<task>`` consumer span itself comes from
  ``opentelemetry-instrumentation-celery``, a child of the producer's ``apply_async/<task>``.
* ``tokenize_span``, ``batch_span`` (one per device batch, linked to every job in it),
  ``forward_span`` (model, kind, device, dtype, shapes, output norm statistics): context
  managers that the inference path and the batcher call.
* ``epoch_span``, ``record_accuracy``, ``record_training_loss`` for training loops.
* ``ml.device.memory`` (bytes) observed at each export.

Capturing a job's span for the batcher: call ``current_span_context()`` in the task thread
when the job's items are submitted (``batcher.submit(..., context=...)``), and pass the
items' contexts (``BatchInfo.contexts``) to ``batch_span`` on the device thread.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from producer import telemetry as base
from producer.contract import TASK_FOR_KIND

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "fleet.worker"

#: Seconds-valued histograms: from a millisecond forward pass to an hour in the queue.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0, 3600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_KIND_FOR_TASK = {task: kind.value for kind, task in TASK_FOR_KIND.items()}
#: Back-links from job spans to batch spans waiting for the job's postrun; a bound against leaks.
_MAX_PENDING_BACKLINKS = 10_000


# --- span handles (real and no-op) ---------------------------------------------------------


class _NoopScope:
    """What every helper returns while telemetry is off: enter, exit and record nothing."""

    __slots__ = ()
    span = None

    def __enter__(self) -> _NoopScope:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def set(self, **attributes: Any) -> None:
        return None

    def record_tokens(self, id_lists: Sequence[Sequence[int]]) -> None:
        return None

    def record_embedding_norms(self, vectors: Any) -> None:
        return None

    def record(self, *, loss: float | None = None, accuracy: float | None = None, **attributes: Any) -> None:
        return None


NOOP = _NoopScope()


class _Scope:
    """A span made current for a ``with`` block; ``on_end(seconds, error)`` runs as it closes."""

    def __init__(self, state: _State, name: str, attributes: Mapping[str, Any], *, context=None, links=None,
                 on_start=None, on_end=None):
        self._state = state
        self._name = name
        self._attributes = attributes
        self._context = context
        self._links = links
        self._on_start = on_start
        self._on_end = on_end
        self._activation = None
        self._started = 0.0
        self.span = None

    def __enter__(self) -> _Scope:
        self._activation = self._state.tracer.start_as_current_span(
            self._name, context=self._context, links=self._links, attributes=dict(self._attributes))
        self.span = self._activation.__enter__()
        self._started = time.perf_counter()
        if self._on_start is not None:
            self._on_start(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._on_end is not None:
                self._on_end(self, time.perf_counter() - self._started, exc)
        finally:
            self._activation.__exit__(exc_type, exc, tb)

    def set(self, **attributes: Any) -> None:
        """Set span attributes; keys use ``__`` for dots (``ml__seq_len`` is ``ml.seq_len``)."""
        if self.span is not None and self.span.is_recording():
            self.span.set_attributes({key.replace("__", "."): value for key, value in attributes.items()})

    def record_tokens(self, id_lists: Sequence[Sequence[int]]) -> None:
        """Token statistics of a tokenised job (``tokenize_span``)."""
        if self.span is not None and self.span.is_recording() and id_lists:
            lengths = [len(ids) for ids in id_lists]
            self.span.set_attributes({"ml.tokens.total": sum(lengths), "ml.tokens.max": max(lengths),
                                      "ml.tokens.min": min(lengths)})

    def record_embedding_norms(self, vectors: Any) -> None:
        """L2 norm statistics of a 2-D output tensor (``forward_span``; before normalisation)."""
        if self.span is None or not self.span.is_recording():
            return
        norms = vectors.detach().float().norm(dim=1)
        if norms.numel() == 0:
            return
        self.span.set_attributes({
            "ml.output.norm.min": float(norms.min()), "ml.output.norm.max": float(norms.max()),
            "ml.output.norm.mean": float(norms.mean()),
            "ml.output.norm.std": float(norms.std()) if norms.numel() > 1 else 0.0,
            "ml.output.finite": bool(vectors.isfinite().all()),
        })

    def record(self, *, loss: float | None = None, accuracy: float | None = None, **attributes: Any) -> None:
        """Training figures of an epoch (``epoch_span``): span attributes and the two gauges."""
        model = self._attributes.get("ml.model.name", "unknown")
        dataset = self._attributes.get("ml.dataset", "unknown")
        if loss is not None:
            self.set(ml__training__loss=float(loss))
            self._state.training_loss.set(float(loss), {"model": model, "dataset": dataset})
        if accuracy is not None:
            self.set(ml__model__accuracy=float(accuracy))
            self._state.accuracy.set(float(accuracy), {"model": model, "dataset": dataset})
        if attributes:
            self.set(**attributes)


# --- installed state -----------------------------------------------------------------------


@dataclass
class _Job:
    started: float
    kind: str
    model: str
    inference: bool


class _State:
    """Tracer, instruments and bookkeeping of one worker process."""

    def __init__(self, tracer_provider=None, meter_provider=None, *, device: str = "cpu",
                 models: Mapping[str, str] | None = None, runtime=None):
        from opentelemetry import metrics, trace

        version = base.fleet_version()
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(INSTRUMENTATION_NAME, version)
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(INSTRUMENTATION_NAME, version)
        self.device = device
        self.models = dict(models) if models is not None else None
        self.runtime = runtime
        self.jobs: dict[str, _Job] = {}
        self.backlinks: dict[int, list] = {}
        self.lock = threading.Lock()

        self.inference_count = meter.create_counter(
            "ml.inference.count", unit="{job}", description="Inference jobs finished, by outcome")
        self.inference_duration = meter.create_histogram(
            "ml.inference.duration", unit="s", description="Inference job run time on the worker (queue wait excluded)",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self.queue_wait = meter.create_histogram(
            "ml.queue.wait", unit="s", description="Time from enqueue (fleet_enqueued_at header) to job start",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self.batch_size = meter.create_histogram(
            "ml.batch.size", unit="{item}", description="Items per device batch (the real batch size)",
            explicit_bucket_boundaries_advisory=BATCH_SIZE_BUCKETS)
        self.forward_duration = meter.create_histogram(
            "ml.forward.duration", unit="s", description="Forward pass time per device batch",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self.accuracy = meter.create_gauge(
            "ml.model.accuracy", unit="1", description="Model accuracy on a dataset (0..1)")
        self.training_loss = meter.create_gauge(
            "ml.training.loss", unit="", description="Training loss at the end of the latest epoch")
        self.in_flight = meter.create_up_down_counter(
            "ml.jobs.in_flight", unit="{job}", description="Jobs executing on this worker now")
        meter.create_observable_gauge(
            "ml.device.memory", callbacks=[self._observe_memory], unit="By",
            description="Memory in use: process RSS, and the CUDA allocator's allocated/reserved bytes")

    # -- labels --

    def kind_of(self, model: str) -> str:
        if self.runtime is not None:
            resident = getattr(self.runtime, "models", {}).get(model)
            if resident is not None:
                return resident.spec.kind.value
        return (self.models or {}).get(model, "unknown")

    def model_label(self, args: Sequence[Any] | None, request: Any) -> str:
        """The job's model, bounded to the models this worker serves (metric labels stay few)."""
        payload = args[0] if args and isinstance(args[0], dict) else {}
        name = payload.get("model")
        served = self.models
        if isinstance(name, str) and (served is None or name in served):
            return name
        routing_key = ((getattr(request, "delivery_info", None) or {}).get("routing_key") or "")
        parts = routing_key.split(".", 2)  # fleet.<kind>.<model>
        if len(parts) == 3 and (served is None or parts[2] in served):
            return parts[2]
        return "unknown"

    # -- observable --

    def _observe_memory(self, options=None):
        from opentelemetry.metrics import Observation

        observations = [Observation(_current_rss_bytes(), {"device": self.device, "type": "rss"})]
        torch = sys.modules.get("torch")
        if torch is not None and self.device.startswith("cuda"):
            try:
                observations.append(Observation(torch.cuda.memory_allocated(self.device),
                                                {"device": self.device, "type": "allocated"}))
                observations.append(Observation(torch.cuda.memory_reserved(self.device),
                                                {"device": self.device, "type": "reserved"}))
            except Exception:  # a metric callback must not raise
                log.debug("CUDA memory figures unavailable", exc_info=True)
        return observations


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_state: _State | None = None


def install(*, tracer_provider=None, meter_provider=None, device: str = "cpu",
            models: Mapping[str, str] | None = None, runtime=None) -> None:
    """Turn the helpers on with these providers (the global ones by default). For tests and ``setup_worker``."""
    global _state
    _state = _State(tracer_provider, meter_provider, device=device, models=models, runtime=runtime)


def uninstall() -> None:
    """Turn the helpers back into no-ops."""
    global _state
    _state = None


def enabled() -> bool:
    return _state is not None


# --- worker setup --------------------------------------------------------------------------


class WorkerTelemetry:
    """What ``setup_worker`` turned on; ``shutdown`` flushes and stops it (no-op when off)."""

    def __init__(self, telemetry: base.Telemetry | None = None):
        self.telemetry = telemetry

    @property
    def enabled(self) -> bool:
        return self.telemetry is not None

    def flush(self) -> None:
        if self.telemetry is not None:
            self.telemetry.flush()

    def shutdown(self) -> None:
        if self.telemetry is None:
            return
        _disconnect_signals()
        uninstall()
        base.shutdown()
        self.telemetry = None


def worker_resource(device: str, device_name: str | None = None, models: Iterable[str] = ()) -> dict[str, Any]:
    """Resource attributes a worker adds: the ML framework and its version, the device, the models."""
    torch = sys.modules.get("torch")
    return {
        "ml.framework.name": "pytorch" if torch is not None else None,
        "ml.framework.version": getattr(torch, "__version__", None),
        "ml.device": device,
        "ml.device.name": device_name,
        "fleet.models": sorted(models) or None,
    }


def setup_worker(device: str, *, runtime=None, device_name: str | None = None,
                 default_service_name: str = "fleet-worker") -> WorkerTelemetry:
    """Set up OTLP export, Celery instrumentation and Fleet's instruments for this worker process.

    Call once, after the models are loaded and before the Celery worker starts; call
    ``shutdown()`` on the result when the worker stops (it flushes spans and metrics).
    A failure here is logged and the worker runs on without telemetry.
    """
    config = base.TelemetryConfig.from_env()
    if not config.enabled:
        return WorkerTelemetry(None)
    try:
        models = {name: resident.spec.kind.value for name, resident in getattr(runtime, "models", {}).items()}
        telemetry = base.setup(default_service_name, config=config,
                               extra_resource=worker_resource(device, device_name, models))
        if telemetry is None:
            return WorkerTelemetry(None)
        install(tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider, device=device,
                models=models if runtime is not None else None, runtime=runtime)
        _connect_signals(telemetry)
    except Exception:  # telemetry must never stop a worker from serving
        log.exception("telemetry setup failed; the worker runs without it")
        uninstall()
        return WorkerTelemetry(None)
    return WorkerTelemetry(telemetry)


def _connect_signals(telemetry: base.Telemetry) -> None:
    from celery import signals

    # Order matters: our postrun must see the run/ span still open (it adds links and the outcome),
    # and our prerun must see it already current (the queue-wait span and the job attributes).
    signals.task_postrun.connect(_on_postrun, weak=False)
    base.instrument_celery(telemetry)
    signals.task_prerun.connect(_on_prerun, weak=False)


def _disconnect_signals() -> None:
    from celery import signals

    signals.task_prerun.disconnect(_on_prerun)
    signals.task_postrun.disconnect(_on_postrun)


# --- per-job: Celery signal handlers -------------------------------------------------------


def enqueued_at(request: Any) -> float | None:
    """The producer's ``fleet_enqueued_at`` header (UNIX seconds), or None if absent or malformed."""
    value = getattr(request, base.ENQUEUED_AT_HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(base.ENQUEUED_AT_HEADER)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _on_prerun(task_id: str | None = None, task: Any = None, args: Sequence[Any] | None = None, **_: Any) -> None:
    state = _state
    if state is None or task is None or task_id is None:
        return
    try:
        _job_started(state, task_id, task, args)
    except Exception:  # telemetry must never fail a job
        log.debug("telemetry prerun failed", exc_info=True)


def _job_started(state: _State, task_id: str, task: Any, args: Sequence[Any] | None) -> None:
    from opentelemetry import trace

    request = task.request
    kind = _KIND_FOR_TASK.get(task.name)
    model = state.model_label(args, request)
    job = _Job(time.perf_counter(), kind or task.name, model, kind is not None)
    with state.lock:
        state.jobs[task_id] = job
    state.in_flight.add(1, {"kind": job.kind, "device": state.device})
    run_span = trace.get_current_span()
    attributes = {"fleet.job.id": task_id, "ml.model.name": model, "ml.model.kind": job.kind, "ml.device": state.device}
    sent_at = enqueued_at(request)
    if sent_at is not None:
        now = time.time()
        wait = max(0.0, now - sent_at)
        attributes["fleet.queue_wait_s"] = wait
        state.queue_wait.record(wait, {"model": model, "kind": job.kind})
        queue = ((getattr(request, "delivery_info", None) or {}).get("routing_key") or "")
        span = state.tracer.start_span(
            "fleet.queue_wait", context=_producer_context(request), kind=trace.SpanKind.INTERNAL,
            start_time=int(min(sent_at, now) * 1e9),
            attributes={"fleet.job.id": task_id, "messaging.destination.name": queue, "fleet.queue_wait_s": wait})
        span.end(end_time=int(now * 1e9))
    if run_span.is_recording():
        run_span.set_attributes(attributes)


def _producer_context(request: Any):
    """The producer's publish span from the message headers (the queue wait's parent), else the current context."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    try:
        from opentelemetry.instrumentation.celery import celery_getter

        context = extract(request, getter=celery_getter)
    except Exception:  # noqa: BLE001 - an unreadable trace header means no parent span, never a failed job
        return None
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def job_outcome(celery_state: str | None, retval: Any) -> str:
    """``success``, the ``ErrorCode`` of a failed job, ``cancelled``, or Celery's state in lower case."""
    if celery_state == "SUCCESS":
        return "success"
    if celery_state == "FAILURE":
        code = getattr(retval, "code", None)
        return getattr(code, "value", None) or (code if isinstance(code, str) else "internal")
    if celery_state in ("IGNORED", "REVOKED"):
        return "cancelled"
    return (celery_state or "unknown").lower()


def _on_postrun(task_id: str | None = None, task: Any = None, retval: Any = None, state: str | None = None,
                **_: Any) -> None:
    current = _state
    if current is None or task_id is None:
        return
    try:
        _job_finished(current, task_id, retval, state)
    except Exception:
        log.debug("telemetry postrun failed", exc_info=True)


def _job_finished(state: _State, task_id: str, retval: Any, celery_state: str | None) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    with state.lock:
        job = state.jobs.pop(task_id, None)
    if job is None:
        return
    seconds = time.perf_counter() - job.started
    outcome = job_outcome(celery_state, retval)
    state.in_flight.add(-1, {"kind": job.kind, "device": state.device})
    attributes = {"model": job.model, "kind": job.kind, "device": state.device, "outcome": outcome}
    if job.inference:
        state.inference_count.add(1, attributes)
        state.inference_duration.record(seconds, attributes)
    run_span = trace.get_current_span()
    if not run_span.is_recording():
        return
    run_span.set_attribute("fleet.outcome", outcome)
    with state.lock:
        batches = state.backlinks.pop(run_span.get_span_context().span_id, ())
    for batch_context in batches:
        run_span.add_link(batch_context, {"fleet.link": "batch"})
    if celery_state == "FAILURE":
        run_span.set_status(Status(StatusCode.ERROR, outcome))


# --- inference path and batcher helpers ----------------------------------------------------


def current_span_context():
    """The span context current in this thread (the job's ``run/`` span in a task thread), or None.

    Capture it when a job hands items to the batcher; pass the captured contexts to ``batch_span``.
    """
    if _state is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def tokenize_span(model: str, texts: int):
    """Span ``fleet.tokenize`` around a job's tokenisation; ``record_tokens(id_lists)`` adds token counts."""
    state = _state
    if state is None:
        return NOOP
    return _Scope(state, "fleet.tokenize", {"ml.model.name": model, "ml.model.kind": state.kind_of(model),
                                            "ml.texts": texts})


def batch_span(model: str, links: Iterable[Any], *, enqueued_at: Sequence[float] | None = None):
    """Span ``fleet.batch`` for one device batch, linked to the span of every job in it.

    ``links``: the span contexts captured with ``current_span_context()`` when each item was
    submitted (None entries are skipped). The first job's span is the batch's parent, so a job's
    trace shows its batch and forward pass; each linked job's ``run/`` span gets a link back.
    ``enqueued_at``: the items' ``time.monotonic()`` arrival times (the batcher's ``BatchInfo``).
    Records ``ml.batch.size``.
    """
    state = _state
    if state is None:
        return NOOP
    from opentelemetry import context as context_api
    from opentelemetry import trace

    contexts = [c for c in links if c is not None and c.is_valid]
    size = len(enqueued_at) if enqueued_at is not None else len(contexts)
    kind = state.kind_of(model)
    attributes = {"ml.model.name": model, "ml.model.kind": kind, "ml.device": state.device, "ml.batch.size": size,
                  "fleet.batch.jobs": len({c.span_id for c in contexts})}
    if enqueued_at:
        attributes["fleet.batch.oldest_wait_s"] = max(0.0, time.monotonic() - min(enqueued_at))
    parent = (trace.set_span_in_context(trace.NonRecordingSpan(contexts[0])) if contexts
              else context_api.Context())
    unique = list({c.span_id: c for c in contexts}.values())
    metric_attributes = {"model": model, "kind": kind, "device": state.device}

    def on_start(scope: _Scope) -> None:
        state.batch_size.record(size, metric_attributes)
        batch_context = scope.span.get_span_context()
        if not batch_context.is_valid:
            return
        with state.lock:
            if len(state.backlinks) > _MAX_PENDING_BACKLINKS:
                state.backlinks.clear()
            for job_context in unique:
                state.backlinks.setdefault(job_context.span_id, []).append(batch_context)

    return _Scope(state, "fleet.batch", attributes, context=parent,
                  links=[trace.Link(c, {"fleet.link": "job"}) for c in unique], on_start=on_start)


def forward_span(model: str, kind: str, device: str, dtype: Any, input_shape: Sequence[int]):
    """Span ``fleet.forward`` around one forward pass; records ``ml.forward.duration``.

    ``input_shape`` is the padded input's shape (batch, sequence length, ...). Keep the
    copy of the output to the CPU inside the block so that on CUDA the span times the
    computation, not just its launch. ``record_embedding_norms(vectors)`` adds output norm
    statistics for embeddings.
    """
    state = _state
    if state is None:
        return NOOP
    shape = [int(d) for d in input_shape]
    attributes = {"ml.model.name": model, "ml.model.kind": kind, "ml.device": device,
                  "ml.dtype": str(dtype).removeprefix("torch."), "ml.input.shape": shape,
                  "ml.batch.size": shape[0] if shape else 0, "ml.seq_len": shape[1] if len(shape) > 1 else 0}
    metric_attributes = {"model": model, "kind": kind, "device": device}

    def on_end(scope: _Scope, seconds: float, error: BaseException | None) -> None:
        state.forward_duration.record(seconds, metric_attributes)

    return _Scope(state, "fleet.forward", attributes, on_end=on_end)


# --- training ------------------------------------------------------------------------------


def epoch_span(model: str, epoch: int, *, epochs: int | None = None, dataset: str | None = None):
    """Span ``fleet.train.epoch``; call ``record(loss=..., accuracy=...)`` before it closes.

    ``record`` sets the span attributes and the ``ml.training.loss`` / ``ml.model.accuracy`` gauges.
    """
    state = _state
    if state is None:
        return NOOP
    attributes = {"ml.model.name": model, "ml.training.epoch": epoch, "ml.device": state.device,
                  "ml.dataset": dataset or "unknown"}
    if epochs is not None:
        attributes["ml.training.epochs"] = epochs
    return _Scope(state, "fleet.train.epoch", attributes)


def record_accuracy(model: str, dataset: str, accuracy: float) -> None:
    """Set ``ml.model.accuracy`` for ``model`` on ``dataset`` (e.g. after evaluation)."""
    if _state is not None:
        _state.accuracy.set(float(accuracy), {"model": model, "dataset": dataset})


def record_training_loss(model: str, loss: float, dataset: str = "unknown") -> None:
    """Set ``ml.training.loss`` for ``model`` (outside an ``epoch_span``)."""
    if _state is not None:
        _state.training_loss.set(float(loss), {"model": model, "dataset": dataset})
