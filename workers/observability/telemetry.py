"""Worker-side telemetry: job, queue-wait, tokenise, batch and forward spans, and the worker's metrics.

Everything here calls the OpenTelemetry API directly. Until ``producer.telemetry.setup`` installs
the SDK, the tracer and the instruments are the API's own no-ops; ``setup_worker`` installs it
(when the environment asks for telemetry), then connects the per-job signal handlers and
registers the observed metrics. The metric names, units and attributes are
``workers.observability.instruments``'s (docs/OBSERVABILITY.md has the table and the span tree).

* per job, from Celery's ``task_prerun``/``task_postrun`` signals (no code in the tasks): a
  ``fleet.queue_wait`` span from the ``fleet_enqueued_at`` header to the job's start,
  ``fleet.queue.wait``, ``fleet.jobs.in_flight`` and ``fleet.job.duration`` (``error.type`` on
  failures); the ``run/<task>`` consumer span itself comes from ``opentelemetry-instrumentation-celery``.
* ``tokenize_span``, ``forward_span`` and ``batch_span`` (the batcher's hook: one span per device
  batch, linked to the span of every job in it, and each job's span linked back).
* ``record_training_progress`` and ``record_generation`` for the training and generation code.
* observed at each collection: process RSS, CUDA allocator memory, the depth of every queue in
  the catalog per priority list, dead letters, and whether this worker is ready.

Capturing a job's span for the batcher: pass ``current_span()`` (the task thread's ``run/`` span)
as ``context`` of ``batcher.submit``; the batcher hands the items' contexts to ``batch_span``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.util.types import AnyValue

from producer import telemetry as base
from producer.contract import TASK_FOR_KIND, TASK_TRAIN, TRAINING_QUEUE
from workers.observability import instruments as names
from workers.observability.instruments import Instruments

log = logging.getLogger(__name__)

_KIND_FOR_TASK = {**{task: kind.value for kind, task in TASK_FOR_KIND.items()}, TASK_TRAIN: "train"}
#: ``ml.model.name`` of training jobs in the job metrics (their own gauges name the model trained).
TRAINING_MODEL_LABEL = "training"

tracer = trace.get_tracer(names.INSTRUMENTATION_NAME, base.fleet_version())
instruments = Instruments()


# --- spans on the inference path ------------------------------------------------------------


def current_span() -> trace.Span:
    """The span current in this thread (a job's ``run/`` span in a task thread); pass it to the batcher."""
    return trace.get_current_span()


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the span current in this thread, or None when nothing records.

    A consumer sends it with a job to the device process, whose batch span takes it as a link
    (``span_from_traceparent``) and answers with its own (``link_to_batch``).
    """
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def span_from_traceparent(traceparent: str | None) -> trace.Span | None:
    """A non-recording span standing for the job span another process sent as ``traceparent``
    (for ``BatchScope``: its batch span links to it), or None if absent or malformed."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))
    return span if span.get_span_context().is_valid else None


def link_to_batch(traceparent: str) -> None:
    """Link the current job span to the device batch (in another process) that computed it."""
    batch = span_from_traceparent(traceparent)
    if batch is not None:
        trace.get_current_span().add_link(batch.get_span_context(), {"fleet.link": "batch"})


def tokenize_span(model: str, kind: str, texts: int):
    """Span ``fleet.tokenize`` around a job's tokenisation; ``record_tokens(span, id_lists)`` adds token counts."""
    return tracer.start_as_current_span("fleet.tokenize", attributes={
        names.MODEL: model, names.KIND: kind, "ml.texts": texts})


def record_tokens(span: trace.Span, id_lists: Sequence[Sequence[int]]) -> None:
    """Token statistics of a tokenised job on its ``fleet.tokenize`` span."""
    if span.is_recording() and id_lists:
        lengths = [len(ids) for ids in id_lists]
        span.set_attributes({"ml.tokens.total": sum(lengths), "ml.tokens.max": max(lengths),
                             "ml.tokens.min": min(lengths)})


@contextmanager
def forward_span(model: str, kind: str, device: str, dtype: Any, input_shape: Sequence[int]) -> Iterator[trace.Span]:
    """Span ``fleet.forward`` around one forward pass; records ``fleet.forward.duration``.

    ``input_shape`` is the padded input's shape (batch, sequence length, ...). Keep the copy of
    the output to the CPU inside the block so that on CUDA the span times the computation, not
    just its launch.
    """
    shape = [int(d) for d in input_shape]
    attributes: dict[str, AnyValue] = {names.MODEL: model, names.KIND: kind, names.DEVICE: device,
                                       "ml.dtype": str(dtype).removeprefix("torch."), "ml.input.shape": shape,
                                       "ml.batch.size": shape[0] if shape else 0,
                                       "ml.seq_len": shape[1] if len(shape) > 1 else 0}
    started = time.perf_counter()
    try:
        with tracer.start_as_current_span("fleet.forward", attributes=attributes) as span:
            yield span
    finally:
        instruments.forward_duration.record(time.perf_counter() - started,
                                            {names.MODEL: model, names.KIND: kind, names.DEVICE: device})


def record_embedding_norms(span: trace.Span, vectors: Any) -> None:
    """L2 norm statistics of a 2-D output tensor on its ``fleet.forward`` span (before normalisation)."""
    if not span.is_recording():
        return
    norms = vectors.detach().float().norm(dim=1)
    if norms.numel() == 0:
        return
    span.set_attributes({
        "ml.output.norm.min": float(norms.min()), "ml.output.norm.max": float(norms.max()),
        "ml.output.norm.mean": float(norms.mean()),
        "ml.output.norm.std": float(norms.std()) if norms.numel() > 1 else 0.0,
        "ml.output.finite": bool(vectors.isfinite().all()),
    })


@dataclass(frozen=True)
class BatchScope:
    """What a serving process knows about its models for batch spans: kind and device per batcher name."""

    device: str
    kinds: dict[str, str] = field(default_factory=dict)

    @contextmanager
    def __call__(self, model: str, info: Any) -> Iterator[trace.Span]:
        """The batcher's hook: span ``fleet.batch`` for one device batch; records ``fleet.batch.size``.

        ``info`` is the batch's ``BatchInfo``: ``contexts`` holds the span each item's job captured
        with ``current_span()`` (None entries are skipped), ``enqueued_at`` the items' arrival times
        (``time.monotonic()``). The first job's span is the batch's parent, so its trace shows its
        batch and forward pass; the batch links to every job's span, and each links back.
        """
        jobs = list({id(span): span for span in info.contexts
                     if span is not None and span.get_span_context().is_valid}.values())
        size = len(info.enqueued_at)
        kind = self.kinds.get(model, "unknown")
        attributes: dict[str, AnyValue] = {names.MODEL: model, names.KIND: kind, names.DEVICE: self.device,
                                           "ml.batch.size": size, "fleet.batch.jobs": len(jobs)}
        if info.enqueued_at:
            attributes["fleet.batch.oldest_wait_s"] = max(0.0, time.monotonic() - min(info.enqueued_at))
        parent = trace.set_span_in_context(jobs[0]) if jobs else None
        links = [trace.Link(job.get_span_context(), {"fleet.link": "job"}) for job in jobs]
        instruments.batch_size.record(size, {names.MODEL: model, names.KIND: kind, names.DEVICE: self.device})
        with tracer.start_as_current_span("fleet.batch", context=parent, links=links, attributes=attributes) as span:
            batch_context = span.get_span_context()
            if batch_context.is_valid:
                for job in jobs:
                    job.add_link(batch_context, {"fleet.link": "batch"})
            yield span


# --- per job: Celery signal handlers -------------------------------------------------------


def enqueued_at(request: Any) -> float | None:
    """The producer's ``fleet_enqueued_at`` header (UNIX seconds), or None if absent or malformed."""
    value = getattr(request, base.ENQUEUED_AT_HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(base.ENQUEUED_AT_HEADER)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def error_type(celery_state: str | None, retval: Any) -> str | None:
    """``error.type`` of a finished job: None on success, the ``ErrorCode`` of a failure, ``cancelled``,
    or Celery's state in lower case."""
    if celery_state == "SUCCESS":
        return None
    if celery_state == "FAILURE":
        code = getattr(retval, "code", None)
        return getattr(code, "value", None) or (code if isinstance(code, str) else "internal")
    if celery_state in ("IGNORED", "REVOKED"):
        return "cancelled"
    return (celery_state or "unknown").lower()


@dataclass
class _Job:
    started: float
    attributes: dict[str, str]


class JobSignals:
    """Per-job spans and metrics from Celery's ``task_prerun``/``task_postrun`` signals.

    ``models`` maps each served model to its kind: a job's ``ml.model.name`` is its payload's model
    when served here, else the model of its queue, else ``unknown`` (label values stay bounded).
    """

    def __init__(self, device: str, models: dict[str, str]):
        self.device = device
        self.models = models
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def connect(self, instrument_celery: Callable[[], None]) -> None:
        """Connect around ``instrument_celery()``: Celery calls a signal's receivers in the order they
        connected, so our postrun runs before the instrumentation ends the ``run/`` span and our prerun
        after it has started it."""
        from celery import signals

        signals.task_postrun.connect(self.on_postrun, weak=False)
        instrument_celery()
        signals.task_prerun.connect(self.on_prerun, weak=False)

    def disconnect(self) -> None:
        from celery import signals

        signals.task_prerun.disconnect(self.on_prerun)
        signals.task_postrun.disconnect(self.on_postrun)

    def model_of(self, args: Sequence[Any] | None, request: Any) -> str:
        payload = args[0] if args and isinstance(args[0], dict) else {}
        name = payload.get("model")
        if isinstance(name, str) and name in self.models:
            return name
        routing_key = ((getattr(request, "delivery_info", None) or {}).get("routing_key") or "")
        parts = routing_key.split(".", 2)  # fleet.<kind>.<model>
        return parts[2] if len(parts) == 3 and parts[2] in self.models else "unknown"

    def on_prerun(self, task_id: str | None = None, task: Any = None, args: Sequence[Any] | None = None,
                  **_: Any) -> None:
        if task is None or task_id is None:
            return
        try:
            self._started(task_id, task, args)
        except Exception:
            log.debug("telemetry prerun failed", exc_info=True)

    def _started(self, task_id: str, task: Any, args: Sequence[Any] | None) -> None:
        request = task.request
        kind = _KIND_FOR_TASK.get(task.name, task.name)
        model = self.model_of(args, request) if kind != "train" else TRAINING_MODEL_LABEL
        attributes = {names.MODEL: model, names.KIND: kind, names.DEVICE: self.device}
        with self._lock:
            self._jobs[task_id] = _Job(time.perf_counter(), attributes)
        instruments.jobs_in_flight.add(1, {names.KIND: kind, names.DEVICE: self.device})
        run_span = trace.get_current_span()
        span_attributes = {"fleet.job.id": task_id, **attributes}
        sent_at = enqueued_at(request)
        if sent_at is not None:
            now = time.time()
            wait = max(0.0, now - sent_at)
            span_attributes["fleet.queue_wait_s"] = wait
            instruments.queue_wait.record(wait, {names.MODEL: model, names.KIND: kind})
            queue = ((getattr(request, "delivery_info", None) or {}).get("routing_key") or "")
            span = tracer.start_span(
                "fleet.queue_wait", context=_producer_context(request), kind=trace.SpanKind.INTERNAL,
                start_time=int(min(sent_at, now) * 1e9),
                attributes={"fleet.job.id": task_id, names.QUEUE: queue, "fleet.queue_wait_s": wait})
            span.end(end_time=int(now * 1e9))
        run_span.set_attributes(span_attributes)

    def on_postrun(self, task_id: str | None = None, retval: Any = None, state: str | None = None,
                   **_: Any) -> None:
        if task_id is None:
            return
        try:
            self._finished(task_id, retval, state)
        except Exception:
            log.debug("telemetry postrun failed", exc_info=True)

    def _finished(self, task_id: str, retval: Any, celery_state: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        with self._lock:
            job = self._jobs.pop(task_id, None)
        if job is None:
            return
        error = error_type(celery_state, retval)
        instruments.jobs_in_flight.add(-1, {names.KIND: job.attributes[names.KIND], names.DEVICE: self.device})
        attributes = dict(job.attributes, **({names.ERROR_TYPE: error} if error else {}))
        instruments.job_duration.record(time.perf_counter() - job.started, attributes)
        run_span = trace.get_current_span()
        if error:
            run_span.set_attribute(names.ERROR_TYPE, error)
        if celery_state == "FAILURE":
            run_span.set_status(Status(StatusCode.ERROR, error))


def _producer_context(request: Any):
    """The producer's publish span from the message headers (the queue wait's parent), else None."""
    from opentelemetry.propagate import extract

    try:
        from opentelemetry.instrumentation.celery import celery_getter

        context = extract(request, getter=celery_getter)
    except Exception:  # noqa: BLE001
        return None
    return context if trace.get_current_span(context).get_span_context().is_valid else None


# --- training and generation -----------------------------------------------------------------


def record_training_progress(model: str, kind: str, progress: Any) -> None:
    """Set ``fleet.training.progress`` (steps done / total) and ``fleet.training.loss`` from a ``TrainProgress``."""
    attributes = {names.MODEL: model, names.TRAINING_KIND: kind}
    if progress.total_steps:
        instruments.training_progress.set(progress.step / progress.total_steps, attributes)
    if progress.loss is not None:
        instruments.training_loss.set(float(progress.loss), attributes)


def record_model_accuracy(model: str, kind: str, accuracy: float) -> None:
    """Set ``fleet.model.accuracy`` (0..1) of a trained model on its evaluation split."""
    instruments.model_accuracy.set(float(accuracy), {names.MODEL: model, names.TRAINING_KIND: kind})


def record_generation(model: str, *, time_to_first_token_s: float, output_tokens: int, duration_s: float,
                      error_type: str | None = None) -> None:
    """Record one generate job's GenAI metrics (see ``instruments.record_generation``)."""
    names.record_generation(instruments, model, time_to_first_token_s=time_to_first_token_s,
                            output_tokens=output_tokens, duration_s=duration_s, error_type=error_type)


# --- observed metrics ------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cuda_memory(device: str, which: str) -> Callable[[], Iterable[tuple[float, dict]]]:
    def observe():
        torch = sys.modules["torch"]
        read = torch.cuda.memory_allocated if which == "allocated" else torch.cuda.memory_reserved
        return [(read(device), {names.DEVICE: device})]

    return observe


def queue_depths(redis_client) -> list[tuple[float, dict]]:
    """Messages waiting per queue in the catalog (and ``fleet.training``) and per priority list.

    One observation per (queue, priority step), from one pipelined round trip after reading the
    catalog. Every worker observes every queue, so a queue whose own workers are all gone is still
    seen; aggregate with ``max`` across workers. Redis errors yield no observation.
    """
    import json

    import redis

    from producer import keys
    from producer.celery_config import PRIORITY_STEPS
    from producer.queues import priority_lists

    try:
        catalog = {name.decode(): json.loads(raw) for name, raw in redis_client.hgetall(keys.CATALOG).items()}
        queues = {entry["queue"]: {names.MODEL: name} for name, entry in catalog.items()}
        queues[TRAINING_QUEUE] = {}
        with redis_client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for name in priority_lists(queue):
                    pipe.llen(name)
            lengths = iter(pipe.execute())
    except (redis.RedisError, ValueError, KeyError, TypeError) as exc:
        log.debug("queue depth not observed: %s", exc)
        return []
    return [(next(lengths), {names.QUEUE: queue, names.PRIORITY: step, **labels})
            for queue, labels in queues.items() for step in PRIORITY_STEPS]


def dead_letters(redis_client) -> list[tuple[float, dict]]:
    """Entries in the dead-letter hash (none observed while Redis is unreachable)."""
    import redis

    from producer import keys

    try:
        return [(redis_client.hlen(keys.DEAD_LETTERS), {})]
    except redis.RedisError:
        return []


def register_observers(device: str, models: Iterable[str], *, redis_client=None,
                       ready: Callable[[], bool] | None = None) -> None:
    """Register the metrics observed at each collection (called once, after the SDK is installed)."""
    instruments.observe("process.memory.usage", lambda: [(_rss_bytes(), {})], unit="By", up_down=True,
                        description="Resident set size of the worker process")
    if device.startswith("cuda"):
        for which in ("allocated", "reserved"):
            instruments.observe(f"fleet.cuda.memory.{which}", _cuda_memory(device, which), unit="By",
                                description=f"Bytes the CUDA caching allocator has {which} on the device")
    if redis_client is not None:
        instruments.observe("fleet.queue.depth", lambda: queue_depths(redis_client), unit="{message}",
                            description="Messages waiting in a queue's Redis list for one priority step "
                                        "(celery_queue_length)")
        instruments.observe("fleet.dead_letters", lambda: dead_letters(redis_client), unit="{job}",
                            description="Jobs in the dead-letter hash fleet:dlq")
    if ready is not None:
        served = sorted(models)
        instruments.observe("fleet.worker.ready", lambda: [(1 if ready() else 0, {names.MODEL: m}) for m in served],
                            unit="{worker}", description="1 while this worker is ready to serve the model, else 0")


# --- worker setup --------------------------------------------------------------------------


@dataclass
class WorkerTelemetry:
    """What ``setup_worker`` connected; ``shutdown`` disconnects it, flushes and stops the SDK."""

    signals: JobSignals | None = None

    def shutdown(self) -> None:
        if self.signals is not None:
            self.signals.disconnect()
            self.signals = None
        base.shutdown()


def setup_device(device: str, *, models: dict[str, str], device_name: str | None = None,
                 default_service_name: str = "fleet-worker") -> WorkerTelemetry:
    """In a worker group's device process: install the SDK (traces of batches and forward passes,
    its memory metrics); no Celery instrumentation and no job signals (those are the consumers')."""
    try:
        if base.setup(default_service_name, resource_attributes=worker_resource(device, device_name, models)):
            register_observers(device, models)
    except Exception:
        log.exception("telemetry setup failed; the device process runs without it")
    return WorkerTelemetry()


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


def setup_worker(device: str, *, models: dict[str, str] | None = None, device_name: str | None = None,
                 redis_client=None, ready: Callable[[], bool] | None = None,
                 default_service_name: str = "fleet-worker") -> WorkerTelemetry:
    """Install the SDK from the environment, instrument Celery, connect the job signals, register observers.

    ``models`` maps each served model to its kind. Call once, after the models are loaded and
    before the Celery worker starts; call ``shutdown()`` on the result when the worker stops (it
    flushes spans and metrics). With telemetry not configured nothing is installed. A failure
    here is logged and the worker runs on without telemetry.
    """
    models = models or {}
    try:
        if not base.setup(default_service_name, resource_attributes=worker_resource(device, device_name, models)):
            return WorkerTelemetry()
        signals = JobSignals(device, models)
        signals.connect(base.instrument_celery)
        register_observers(device, models, redis_client=redis_client, ready=ready)
    except Exception:
        log.exception("telemetry setup failed; the worker runs without it")
        return WorkerTelemetry()
    return WorkerTelemetry(signals)
