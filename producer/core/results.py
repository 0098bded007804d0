"""Reading a job's stored result: its state, its ``JobStatus`` and its typed outcome. No I/O.

Celery's Redis result backend stores (and publishes) a JSON object per job under
``celery-task-meta-<id>``: ``{"status": <Celery state>, "result": ..., "traceback": ...,
"children": [], "date_done": <ISO 8601 or null>, "task_id": <id>}``. For FAILURE and REVOKED,
``result`` is the exception as ``{"exc_type", "exc_message", "exc_module"}``. This module reads
those objects without Celery, and writes the one Fleet's clients store themselves: the REVOKED
marker of a job that no worker started (``unstarted_marker``; docs/PROTOCOL.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from producer.contract import (
    CELERY_STATE_TO_STATUS,
    ClassifyResult,
    EmbedResult,
    GenerateResult,
    JobStatus,
    ModelKind,
    TrainProgress,
    TrainResult,
)
from producer.core.requests import TRAIN_KIND
from producer.errors import FleetError, JobCancelledError, JobExpiredError, JobFailedError

SUCCESS, FAILURE, REVOKED, PROGRESS = "SUCCESS", "FAILURE", "REVOKED", "PROGRESS"
#: States after which a job never changes again.
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
#: The REVOKED reasons Fleet stores: a cancelled job, and one whose deadline passed before it started.
REASON_CANCELLED, REASON_EXPIRED = "cancelled", "expired"

RESULT_FOR_KIND: dict[str, type[BaseModel]] = {
    ModelKind.EMBED.value: EmbedResult,
    ModelKind.CLASSIFY.value: ClassifyResult,
    ModelKind.GENERATE.value: GenerateResult,
    TRAIN_KIND: TrainResult,
}
#: For a job of unknown kind (no job record: sent by a plain Celery client), the field that tells its result type.
RESULT_BY_FIELD: tuple[tuple[str, type[BaseModel]], ...] = (
    ("loss_curve", TrainResult), ("predictions", ClassifyResult), ("finish_reason", GenerateResult),
    ("dim", EmbedResult))


@dataclass(frozen=True)
class ResultMeta:
    """One stored or published result object: the Celery ``state`` and its ``result`` value."""

    state: str
    result: Any

    @property
    def ready(self) -> bool:
        return self.state in READY_STATES

    @property
    def revoked_reason(self) -> str:
        """For REVOKED: the reason Celery stored (``TaskRevokedError(reason)``), e.g. ``"expired"``."""
        message = self.result.get("exc_message") if isinstance(self.result, dict) else None
        if isinstance(message, list) and message:
            return str(message[0])
        return str(message or self.result or "")


def decode_meta(payload: bytes | str | None) -> ResultMeta | None:
    """The result object in ``payload`` (None when there is none yet).

    A payload that is not a JSON object with a ``status`` reads as a FAILURE saying so.
    """
    if payload is None:
        return None
    try:
        meta = json.loads(payload)
        return ResultMeta(str(meta["status"]), meta.get("result"))
    except (ValueError, TypeError, KeyError) as exc:
        return ResultMeta(FAILURE, {"exc_type": "UndecodableResult", "exc_message": [str(exc)]})


def status_of(meta: ResultMeta | None, has_record: bool) -> JobStatus:
    """The ``JobStatus`` of a job given its result object and whether its job record exists.

    No result and no record: ``UNKNOWN`` (never submitted through Fleet, or long expired).
    """
    if meta is None:
        return JobStatus.QUEUED if has_record else JobStatus.UNKNOWN
    if meta.state == REVOKED and meta.revoked_reason == REASON_EXPIRED:
        return JobStatus.EXPIRED
    return CELERY_STATE_TO_STATUS.get(meta.state, JobStatus.UNKNOWN)


def outcome(job_id: str, meta: ResultMeta, kind: str | None) -> BaseModel | FleetError:
    """A finished job's typed result, or the ``FleetError`` it ended with (returned, not raised)."""
    if meta.state == SUCCESS:
        return _typed_result(job_id, meta.result, kind)
    if meta.state == REVOKED:
        if meta.revoked_reason == REASON_EXPIRED:
            return JobExpiredError(f"job {job_id} passed its deadline before it started; it was not computed")
        return JobCancelledError(f"job {job_id} was cancelled")
    if meta.state == FAILURE:
        return _failure(job_id, meta.result)
    return JobFailedError("internal", f"job {job_id} ended in unexpected state {meta.state}")


def progress_of(meta: ResultMeta | None) -> TrainProgress | None:
    """The latest ``TrainProgress`` of a running training job, else None."""
    if meta is None or meta.state != PROGRESS or not isinstance(meta.result, dict):
        return None
    return TrainProgress.model_validate(meta.result)


def _typed_result(job_id: str, value: Any, kind: str | None) -> BaseModel | FleetError:
    result_cls = RESULT_FOR_KIND.get(kind or "")
    if result_cls is None and isinstance(value, dict):
        result_cls = next((cls for field, cls in RESULT_BY_FIELD if field in value), None)
    if result_cls is None:
        return JobFailedError("internal", f"job {job_id} succeeded with a result of no known kind")
    try:
        return result_cls.model_validate(value)
    except ValidationError as exc:
        return JobFailedError("internal", f"job {job_id}'s result is not a valid {result_cls.__name__}",
                              {"errors": [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]})


def _failure(job_id: str, value: Any) -> JobFailedError:
    """Rebuild the worker's ``JobFailedError`` from Celery's JSON form of it; anything else is ``internal``."""
    if isinstance(value, dict) and value.get("exc_type") == "JobFailedError":
        args = value.get("exc_message")
        if isinstance(args, list) and args and isinstance(args[0], str):
            message = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            details = args[2] if len(args) > 2 and isinstance(args[2], dict) else {}
            return JobFailedError(args[0], message, details)
    if isinstance(value, dict):
        return JobFailedError("internal", f"job {job_id} failed: {value.get('exc_type')}: {value.get('exc_message')}")
    return JobFailedError("internal", f"job {job_id} failed: {value!r}")


def unstarted_marker(job_id: str, reason: str, now: float) -> str:
    """The REVOKED result object a client stores for a job no worker started (reason ``expired`` or
    ``cancelled``): the JSON object Celery's ``mark_as_revoked`` stores in a worker, so every reader
    (Celery's ``AsyncResult`` included) reads it the same."""
    return json.dumps({
        "status": REVOKED,
        "result": {"exc_type": "TaskRevokedError", "exc_message": [reason], "exc_module": "celery.exceptions"},
        "traceback": None,
        "children": [],
        "date_done": datetime.fromtimestamp(now, UTC).isoformat(),
        "task_id": job_id,
    })
