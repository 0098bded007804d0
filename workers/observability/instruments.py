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
installs one they record. Units follow UCUM (``s``, ``By``, ``{job}``); fractions have none (see
``GAUGES``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation, UpDownCounter, _Gauge

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


#: Every histogram: (attribute of ``Instruments``, name, unit, bucket boundaries, description).
HISTOGRAMS = (
    ("job_duration", "fleet.job.duration", "s", SECONDS_BUCKETS,
     "Job run time on the worker, task start to end (queue wait excluded); its count is jobs finished, "
     "with error.type on failures"),
    ("queue_wait", "fleet.queue.wait", "s", SECONDS_BUCKETS,
     "Time from enqueue (fleet_enqueued_at header) to job start"),
    ("batch_size", "fleet.batch.size", "{item}", BATCH_SIZE_BUCKETS, "Items per device batch (the real batch size)"),
    ("forward_duration", "fleet.forward.duration", "s", SECONDS_BUCKETS, "Forward pass time per device batch"),
    ("time_to_first_token", "gen_ai.server.time_to_first_token", "s", TOKEN_SECONDS_BUCKETS,
     "Time to generate the first token of a generate job (prefill), from its start"),
    ("time_per_output_token", "gen_ai.server.time_per_output_token", "s", TOKEN_SECONDS_BUCKETS,
     "Time per output token after the first, per generate job"),
)
#: Every synchronous gauge: (attribute, name, unit, description). Fractions carry no unit: the
#: Collector's Prometheus exporter would add ``_ratio`` to a ``1`` unit and the SDK's would not.
GAUGES = (
    ("training_progress", "fleet.training.progress", "", "Steps done over total steps of the running training job"),
    ("training_loss", "fleet.training.loss", "", "Training loss at the latest progress report"),
    ("model_accuracy", "fleet.model.accuracy", "", "Accuracy (0..1) on the evaluation split"),
)


class Instruments:
    """Every synchronous instrument Fleet records, on ``meter`` (the API's global meter by default).

    Attributes: the first column of ``HISTOGRAMS`` and ``GAUGES``, and ``jobs_in_flight``.
    """

    # Set from the HISTOGRAMS and GAUGES tables in __init__ (a unit test keeps the two in step).
    job_duration: Histogram
    queue_wait: Histogram
    batch_size: Histogram
    forward_duration: Histogram
    time_to_first_token: Histogram
    time_per_output_token: Histogram
    training_progress: _Gauge
    training_loss: _Gauge
    model_accuracy: _Gauge
    jobs_in_flight: UpDownCounter

    def __init__(self, meter: Meter | None = None) -> None:
        from opentelemetry import metrics

        from producer.telemetry import fleet_version

        self.meter = meter or metrics.get_meter(INSTRUMENTATION_NAME, fleet_version())
        for attribute, name, unit, buckets, description in HISTOGRAMS:
            setattr(self, attribute, self.meter.create_histogram(
                name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets))
        for attribute, name, unit, description in GAUGES:
            setattr(self, attribute, self.meter.create_gauge(name, unit=unit, description=description))
        self.jobs_in_flight = self.meter.create_up_down_counter(
            "fleet.jobs.in_flight", unit="{job}", description="Jobs executing on this worker now")

    def observe(self, name: str, observe: Observe, *, unit: str, description: str, up_down: bool = False) -> None:
        """Register an observable gauge (or up-down counter) whose callback calls ``observe()``.

        ``observe`` returns ``(value, attributes)`` pairs; an exception in it is logged by the SDK
        and drops that collection only.
        """
        from opentelemetry.metrics import Observation

        def callback(_options: CallbackOptions) -> list[Observation]:
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
