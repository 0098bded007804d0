"""Names, limits, statuses and the structured error shared by producer and workers.

This module and its siblings in ``producer.contract`` are the only code both sides
import. Everything that crosses Redis is JSON built from these models.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, field_validator

__all__ = [
    "PROTOCOL_VERSION", "TASK_EMBED", "TASK_CLASSIFY", "TASK_GENERATE", "TASK_TRAIN",
    "QUEUE_PREFIX", "TRAINING_QUEUE", "ModelKind", "TASK_FOR_KIND", "MODEL_NAME_PATTERN",
    "MODEL_VERSION_PATTERN", "MODEL_REF_PATTERN", "ModelRef", "split_model_ref", "inference_queue", "Limits",
    "JobStatus", "CELERY_STATE_TO_STATUS", "ErrorCode",
    "JobError", "WireModel", "Finite", "refuse_non_finite",
]

PROTOCOL_VERSION = 1

#: Celery task names. A producer sends by name and never imports worker code.
TASK_EMBED = "fleet.embed"
TASK_CLASSIFY = "fleet.classify"
TASK_GENERATE = "fleet.generate"
TASK_TRAIN = "fleet.train"

#: Queue prefix. Inference jobs go to one queue per served model,
#: ``fleet.<kind>.<model>``, so that a job reaches only workers that hold its model.
QUEUE_PREFIX = "fleet"
#: Training jobs have one queue of their own, consumed only by ``fleet worker --train``.
TRAINING_QUEUE = "fleet.training"


class ModelKind(str, Enum):
    """What an inference model does; each kind has its own task and request shape."""

    EMBED = "embed"
    CLASSIFY = "classify"
    GENERATE = "generate"


TASK_FOR_KIND: dict[ModelKind, str] = {
    ModelKind.EMBED: TASK_EMBED,
    ModelKind.CLASSIFY: TASK_CLASSIFY,
    ModelKind.GENERATE: TASK_GENERATE,
}

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}$"
#: A model version: what follows ``@`` in a model reference (``digits-mlp@2``, ``minilm@2024.06``).
MODEL_VERSION_PATTERN = r"^[a-z0-9][a-z0-9_.\-]{0,31}$"
#: A model reference: a model name, optionally pinned to one version (``name@version``). Jobs, the
#: registry and the catalog name models by reference; a name without a version means the version the
#: serving worker holds as current (docs/PROTOCOL.md, "Model versions").
MODEL_REF_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,63}(@[a-z0-9][a-z0-9_.\-]{0,31})?$"
_MODEL_REF_RE = re.compile(MODEL_REF_PATTERN)
#: A request field naming a model by reference.
ModelRef = Annotated[StrictStr, Field(pattern=MODEL_REF_PATTERN)]


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """``"digits-mlp@2"`` -> ``("digits-mlp", "2")``; ``"minilm"`` -> ``("minilm", None)``.

    Raises ``ValueError`` for a reference outside ``MODEL_REF_PATTERN``.
    """
    if not _MODEL_REF_RE.match(ref):
        raise ValueError(f"model {ref!r} does not match {MODEL_REF_PATTERN} (a name, or name@version)")
    name, _, version = ref.partition("@")
    return name, version or None


def inference_queue(kind: ModelKind | str, model: str) -> str:
    """Return the Redis queue (list) name for jobs of ``kind`` on ``model`` (a name or ``name@version``):
    ``fleet.<kind>.<model>``. The queue of a bare name takes jobs for whichever version a worker holds
    as current; the queue of ``name@version`` only jobs pinned to that version.

    Raises ``ValueError`` for a reference outside ``MODEL_REF_PATTERN``.
    """
    split_model_ref(model)
    return f"{QUEUE_PREFIX}.{ModelKind(kind).value}.{model}"


class Limits:
    """Input limits, enforced by the client before enqueue and by the worker again."""

    MAX_TEXTS_PER_JOB = 256
    MAX_CHARS_PER_TEXT = 8_192
    MAX_PROMPT_CHARS = 8_192
    MAX_NEW_TOKENS = 512
    MAX_STOP_STRINGS = 8
    MAX_LABELS_RETURNED = 32
    MAX_FEATURES_PER_INPUT = 4_096
    #: An invalid payload longer than this as JSON is refused without per-item error details (defence in
    #: depth); a request within the limits above is never refused for its size.
    MAX_PAYLOAD_BYTES = 4 * 1024 * 1024


class JobStatus(str, Enum):
    """Life cycle of a job as the client reports it."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    RETRYING = "retrying"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED)


#: Celery result-backend state -> JobStatus. ``PROGRESS`` is Fleet's custom running state.
CELERY_STATE_TO_STATUS: dict[str, JobStatus] = {
    "PENDING": JobStatus.QUEUED,
    "RECEIVED": JobStatus.QUEUED,
    "STARTED": JobStatus.RUNNING,
    "PROGRESS": JobStatus.RUNNING,
    "RETRY": JobStatus.RETRYING,
    "SUCCESS": JobStatus.SUCCEEDED,
    "FAILURE": JobStatus.FAILED,
    "REVOKED": JobStatus.CANCELLED,
}


class ErrorCode(str, Enum):
    """Machine-readable reason a job failed. Stable: clients branch on these."""

    INVALID_INPUT = "invalid_input"
    #: The message itself (framing, content type, encoding, body shape) is not one a worker can run.
    INVALID_MESSAGE = "invalid_message"
    #: ``register_as`` names a model the registry already holds.
    MODEL_NAME_TAKEN = "model_name_taken"
    #: A generate prompt with more tokens than the model has room for; details: ``prompt_tokens``,
    #: ``max_prompt_tokens`` (the room), ``max_seq_len``, ``max_new_tokens``.
    PROMPT_TOO_LONG = "prompt_too_long"
    UNKNOWN_MODEL = "unknown_model"
    WRONG_MODEL_KIND = "wrong_model_kind"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    OUT_OF_MEMORY = "out_of_memory"
    MODEL_ERROR = "model_error"
    WORKER_LOST = "worker_lost"
    INTERNAL = "internal"
    # Refusals by the client, before anything is enqueued (never stored by a worker):
    #: the idempotency key is bound to a different request
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    #: a caller-supplied job id is already in use
    JOB_ID_CONFLICT = "job_id_conflict"
    #: no live worker serves the model
    MODEL_UNAVAILABLE = "model_unavailable"
    # Refusals of model lifecycle commands (docs/PROTOCOL.md, "Model lifecycle"), besides
    # unknown_model, wrong_model_kind and model_error:
    #: the model's estimated size exceeds the device memory free now; details: needed and free bytes
    INSUFFICIENT_MEMORY = "insufficient_memory"
    #: the worker already serves that model (that version)
    ALREADY_LOADED = "already_loaded"
    #: the worker does not serve the model it was told to unload or switch
    NOT_LOADED = "not_loaded"
    #: the worker holds as many models as its device process has slots for
    TOO_MANY_MODELS = "too_many_models"


def refuse_non_finite(value: Any) -> Any:
    """Refuse NaN and the infinities with one clear message, before any range check sees them
    (JSON has no such numbers, and a range check would report them as out of range)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


#: Put in an ``Annotated`` number field: NaN and infinity are refused as "not a finite number".
Finite = BeforeValidator(refuse_non_finite)


class JobError(BaseModel):
    """The structured error carried by a FAILURE result."""

    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class WireModel(BaseModel):
    """Base for wire models: unknown fields are refused, instances are immutable.

    Fields that must not be coerced (texts, flags, counts) use pydantic's ``Strict*`` types.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("v", mode="before", check_fields=False)
    @classmethod
    def _speaks_this_protocol(cls, value: Any) -> int:
        """A request's ``v`` (where the model has one) must be the integer version this contract describes:
        the worker refuses any other (``unsupported_protocol``), so the producer must not send it."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"v is the protocol version, the integer {PROTOCOL_VERSION}; got "
                             f"{type(value).__name__} {value!r}")
        if value != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {value!r} is not supported (this contract is version "
                             f"{PROTOCOL_VERSION})")
        return value
