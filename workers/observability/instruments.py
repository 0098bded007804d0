"""Fleet's metrics: one table of names, units and attributes (docs/OBSERVABILITY.md shows it).

Conventions:

* Fleet's own metrics are named ``fleet.*``; where OpenTelemetry's semantic conventions define a
  metric, its name is used instead: ``process.memory.usage`` and the GenAI server metrics
  ``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token``.
* Attributes use OpenTelemetry names: a failed job carries ``error.type`` (its ``ErrorCode``, or
  ``cancelled``), a successful one none; a queue is ``messaging.destination.name``. The model is
  ``ml.model.name`` on every metric and span; GenAI metrics also carry ``gen_ai.request.model``.
* Attribute values are bounded (models this worker serves or lists in its catalog, kinds, devices,
  error codes); per-process facts (host, pod, ``service.instance.id``) are resource attributes,
  which Prometheus shows once in ``target_info``, never as labels on every series.

The instruments are created on the OpenTelemetry API's global meter when ``Instruments()`` is
built. Before an SDK is installed they are the API's no-op proxies; once ``producer.telemetry.setup``
installs one they record. Units follow UCUM (``s``, ``By``, ``{job}``); fractions (0..1) have no
unit rather than ``1``, because the Collector's Prometheus exporter would add ``_ratio`` to their
names and the SDK's would not: with none, both paths give Prometheus the same names.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

#: Seconds-valued histograms: from a millisecond forward pass to an hour in the queue.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Token-time histograms (GenAI semantic conventions' advised boundaries).
TOKEN_SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

INSTRUMENTATION_NAME = "fleet.worker"

# Attribute names (OpenTelemetry's where one exists).
MODEL = "ml.model.name"
KIND = "ml.model.kind"
DEVICE = "ml.device"
ERROR_TYPE = "error.type"
QUEUE = "messaging.destination.name"
PRIORITY = "fleet.queue.priority"
TRAINING_KIND = "fleet.training.kind"
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_MODEL = "gen_ai.request.model"

Observe = Callable[[], Iterable[tuple[float, Mapping[str, Any]]]]


class Instruments:
    """Every synchronous instrument Fleet records, on ``meter`` (the API's global meter by default)."""

    def __init__(self, meter=None):
        from opentelemetry import metrics

        from producer.telemetry import fleet_version

        self.meter = meter or metrics.get_meter(INSTRUMENTATION_NAME, fleet_version())
        histogram = self.meter.create_histogram
        self.job_duration = histogram(
            "fleet.job.duration", unit="s", explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            description="Job run time on the worker, task start to end (queue wait excluded); its count is jobs "
                        "finished, with error.type on failures")
        self.queue_wait = histogram(
            "fleet.queue.wait", unit="s", explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            description="Time from enqueue (fleet_enqueued_at header) to job start")
        self.batch_size = histogram(
            "fleet.batch.size", unit="{item}", explicit_bucket_boundaries_advisory=BATCH_SIZE_BUCKETS,
            description="Items per device batch (the real batch size)")
        self.forward_duration = histogram(
            "fleet.forward.duration", unit="s", explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            description="Forward pass time per device batch")
        self.time_to_first_token = histogram(
            "gen_ai.server.time_to_first_token", unit="s", explicit_bucket_boundaries_advisory=TOKEN_SECONDS_BUCKETS,
            description="Time to generate the first token of a generate job (prefill), from its start")
        self.time_per_output_token = histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            explicit_bucket_boundaries_advisory=TOKEN_SECONDS_BUCKETS,
            description="Time per output token after the first, per generate job")
        self.jobs_in_flight = self.meter.create_up_down_counter(
            "fleet.jobs.in_flight", unit="{job}", description="Jobs executing on this worker now")
        self.training_progress = self.meter.create_gauge(
            "fleet.training.progress", unit="", description="Steps done over total steps of the running training job")
        self.training_loss = self.meter.create_gauge(
            "fleet.training.loss", unit="", description="Training loss at the latest progress report")
        self.model_accuracy = self.meter.create_gauge(
            "fleet.model.accuracy", unit="", description="Accuracy (0..1) on the evaluation split")

    def observe(self, name: str, observe: Observe, *, unit: str, description: str, up_down: bool = False) -> None:
        """Register an observable gauge (or up-down counter) whose callback calls ``observe()``.

        ``observe`` returns ``(value, attributes)`` pairs; an exception in it is logged by the SDK
        and drops that collection only.
        """
        from opentelemetry.metrics import Observation

        def callback(_options):
            return [Observation(value, dict(attributes)) for value, attributes in observe()]

        create = self.meter.create_observable_up_down_counter if up_down else self.meter.create_observable_gauge
        create(name, callbacks=[callback], unit=unit, description=description)


def generation_attributes(model: str, error_type: str | None = None) -> dict[str, str]:
    """Attributes of the GenAI metrics for one generate job of ``model``."""
    attributes = {GEN_AI_OPERATION: "text_completion", GEN_AI_PROVIDER: "fleet", GEN_AI_MODEL: model, MODEL: model}
    if error_type:
        attributes[ERROR_TYPE] = error_type
    return attributes


def record_generation(instruments: Instruments, model: str, *, time_to_first_token_s: float,
                      output_tokens: int, duration_s: float, error_type: str | None = None) -> None:
    """Record one generate job: time to its first token and mean time per later output token.

    ``duration_s`` runs from the job's start to its last token; with one token or fewer only the
    time to first token is recorded (time per output token is undefined).
    """
    attributes = generation_attributes(model, error_type)
    instruments.time_to_first_token.record(time_to_first_token_s, attributes)
    if output_tokens > 1:
        instruments.time_per_output_token.record(
            max(0.0, duration_s - time_to_first_token_s) / (output_tokens - 1), attributes)
