"""Celery tasks: thin wrappers that validate a payload, run it, and return a contract result.

Every failure a payload can cause becomes a ``JobFailedError`` with an ``ErrorCode``: the
job ends in FAILURE with a structured error and the worker keeps serving.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from celery import states
from celery.exceptions import Ignore
from celery.utils.time import maybe_iso8601
from celery.worker.request import Request
from pydantic import BaseModel, ValidationError

from producer import keys
from producer.contract import (
    PROTOCOL_VERSION,
    TASK_CLASSIFY,
    TASK_EMBED,
    TASK_GENERATE,
    ClassifyRequest,
    EmbedRequest,
    ErrorCode,
    GenerateRequest,
    Limits,
    ModelKind,
)
from producer.errors import JobFailedError
from workers.serving import inference
from workers.serving import runtime as runtime_module
from workers.queue.app import app
from workers.queue.dlq import dead_letter

log = logging.getLogger(__name__)


def parse_payload(request_cls: type[BaseModel], args: tuple, kwargs: dict) -> BaseModel:
    """Turn a task's raw arguments into ``request_cls`` or raise ``JobFailedError(invalid_input)``.

    The wire format is exactly one positional JSON object (docs/PROTOCOL.md).
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        raise JobFailedError(ErrorCode.INVALID_INPUT.value,
                             "expected exactly one positional argument: the request object",
                             {"positional": len(args), "keywords": sorted(kwargs)})
    payload = args[0]
    version = payload.get("v", PROTOCOL_VERSION)
    # Another integer is a version this worker does not speak; any other value is a malformed request,
    # refused below with the contract's message (invalid_input: "v is the protocol version, the integer 1").
    if isinstance(version, int) and not isinstance(version, bool) and version != PROTOCOL_VERSION:
        raise JobFailedError(ErrorCode.UNSUPPORTED_PROTOCOL.value,
                             f"protocol version {version!r} not supported (this worker speaks {PROTOCOL_VERSION})")
    try:
        return request_cls.model_validate(payload)
    except ValidationError as exc:
        # A request the contract accepts is never refused for its size (256 texts of 8192 non-ASCII
        # characters exceed MAX_PAYLOAD_BYTES as JSON); an invalid oversized one gets no per-item details.
        if len(json.dumps(payload)) > Limits.MAX_PAYLOAD_BYTES:
            raise JobFailedError(ErrorCode.INVALID_INPUT.value,
                                 f"invalid {request_cls.__name__}; payload exceeds {Limits.MAX_PAYLOAD_BYTES} bytes",
                                 {"error_count": exc.error_count()}) from None
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise JobFailedError(ErrorCode.INVALID_INPUT.value, f"invalid {request_cls.__name__}",
                             {"errors": errors}) from None


#: Request attribute naming the malformed Celery protocol headers ``FleetRequest`` dropped.
BAD_HEADERS = "fleet_bad_headers"


def _drop_malformed_headers(headers: dict) -> dict[str, str]:
    """Replace the Celery protocol headers that the worker would choke on; return ``{name: repr}`` of each.

    Celery trusts these: an ``id`` that is not a string, a ``timelimit`` that is not a pair of numbers or
    ``stamped_headers`` that is not a list raises inside the consumer and kills the worker (and every worker
    the unacked message goes to next); an ``eta``/``expires`` that is not ISO 8601 makes Celery discard the
    message with no result.
    """
    bad: dict[str, str] = {}

    def drop(name: str, replacement: Any) -> None:
        bad[name] = repr(headers[name])[:200]
        headers[name] = replacement

    if "id" in headers and not isinstance(headers["id"], str):  # an unhashable id kills the consumer
        drop("id", json.dumps(headers["id"], default=repr))
    if headers.get("shadow") is not None and not isinstance(headers["shadow"], str):  # lost in the pool
        drop("shadow", None)
    limits = headers.get("timelimit")
    if limits and not (isinstance(limits, (list, tuple)) and len(limits) == 2 and all(
            limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool)) for limit in limits)):
        drop("timelimit", [None, None])
    for name in ("eta", "expires"):
        if headers.get(name) is not None:
            try:
                maybe_iso8601(headers[name])
            except (AttributeError, ValueError, TypeError):
                drop(name, None)
    stamped = headers.get("stamped_headers")
    if stamped is not None and not (isinstance(stamped, list) and all(isinstance(h, str) for h in stamped)):
        drop("stamped_headers", None)
    if headers.get("stamps") is not None and not isinstance(headers["stamps"], dict):
        drop("stamps", None)
    return bad


class FleetRequest(Request):
    """Celery's worker-side request, minus its trust in protocol headers: a malformed one is dropped
    before Celery reads it, and ``run_job`` fails the job with ``invalid_input`` naming it."""

    def __init__(self, message, *args, headers=None, **kwargs):
        headers = message.headers if headers is None else headers
        bad = _drop_malformed_headers(headers) if isinstance(headers, dict) else {}
        super().__init__(message, *args, headers=headers, **kwargs)
        if bad:
            self._request_dict[BAD_HEADERS] = bad


def refuse_bad_headers(task) -> None:
    """Fail the job with ``invalid_input`` if ``FleetRequest`` dropped malformed headers from its message."""
    bad_headers = getattr(task.request, BAD_HEADERS, None)
    if bad_headers:
        raise JobFailedError(ErrorCode.INVALID_INPUT.value, f"malformed message header(s): {', '.join(bad_headers)}",
                             {"headers": bad_headers})


@dataclass
class JobContext:
    """What a running job may ask of its task: attempts, deadline, cancellation, dead-lettering, streaming."""

    task: Any

    @property
    def job_id(self) -> str:
        return self.task.request.id

    @property
    def redis(self):
        return self.task.backend.client

    def begin_attempt(self) -> int:
        """Count this delivery of the job; return how many deliveries there have been (1 = first).

        Also takes the job off ``keys.PENDING`` and drops the request copy from its record: its
        message reached a worker, so the delivery sweeper has nothing to re-send.
        """
        key = keys.attempts(self.job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, app.conf.result_expires)
            pipe.zrem(keys.PENDING, self.job_id)
            pipe.hdel(keys.job_record(self.job_id), "request")
            attempt = pipe.execute()[0]
        return int(attempt)

    def already_finished(self) -> bool:
        """True if the result backend already holds this job's SUCCESS (a redelivery after a lost ack)."""
        return self.task.backend.get_state(self.job_id) == states.SUCCESS

    def expired(self) -> bool:
        """True if the job's deadline (Celery ``expires``) has passed."""
        expires = self.task.request.expires
        if not expires:
            return False
        # Celery's own ISO 8601 parser (dateutil): it accepted this header, and it takes forms that
        # datetime.fromisoformat refuses ("2030-01", "2030-01-01T24:00").
        deadline = maybe_iso8601(expires) if isinstance(expires, str) else expires
        if deadline.tzinfo is None:  # ISO 8601 without an offset: UTC, as Celery reads it (enable_utc)
            deadline = deadline.replace(tzinfo=timezone.utc)
        return datetime.now(timezone.utc) >= deadline

    def stop_as_expired(self) -> None:
        """Store REVOKED("expired"), as Celery does for jobs it drops at receipt, and end the task."""
        self.task.backend.mark_as_revoked(self.job_id, reason="expired", request=self.task.request)
        raise Ignore()

    def dead_letter(self, payload: Any, reason: str, attempt: int) -> None:
        """Move the job to the dead-letter list with ``reason``."""
        queue = (self.task.request.delivery_info or {}).get("routing_key", "")
        dead_letter(self.redis, self.job_id, task=self.task.name, queue=queue, payload=payload, reason=reason,
                    attempts=attempt)
        log.error("job %s dead-lettered after %d attempt(s): %s", self.job_id, attempt, reason)

    def cancelled(self) -> bool:
        """True once ``handle.cancel()`` was called for this job."""
        return bool(self.job_id) and bool(self.task.backend.client.exists(keys.cancel_flag(self.job_id)))

    def stop_as_cancelled(self) -> None:
        """Store REVOKED for this job and end the task without a result (the message is acked)."""
        self.task.backend.mark_as_revoked(self.job_id, reason="cancelled", request=self.task.request)
        raise Ignore()

    def publish_piece(self, piece: str | None) -> None:
        """Append a piece of streamed output; ``None`` marks the end of the stream."""
        client = self.task.backend.client
        stream = keys.token_stream(self.job_id)
        fields = {"done": "1"} if piece is None else {"piece": piece}
        with client.pipeline(transaction=False) as pipe:
            pipe.xadd(stream, fields, maxlen=Limits.MAX_NEW_TOKENS + 16, approximate=True)
            pipe.expire(stream, app.conf.result_expires)
            pipe.execute()


Execute = Callable[[Any, BaseModel, JobContext], BaseModel]


def run_job(task, kind: ModelKind, request_cls: type[BaseModel], args: tuple, kwargs: dict,
            execute: Execute) -> dict:
    """Validate, check cancellation and deadline, run ``execute(resident_model, request, context)``.

    Returns the result as JSON. A run that raises unexpectedly is retried (backoff) until the
    job has had ``max_attempts`` deliveries; deliveries lost to a dying worker count too. Past
    that the job is dead-lettered and fails with its reason.
    """
    runtime = runtime_module.current()
    context = JobContext(task)
    attempt = context.begin_attempt()
    if attempt > 1 and context.already_finished():
        log.info("job %s already succeeded; skipping its redelivery", context.job_id)
        raise Ignore()  # keep the stored result; compute nothing twice
    refuse_bad_headers(task)
    request = parse_payload(request_cls, args, kwargs)
    if context.cancelled():
        context.stop_as_cancelled()
    if context.expired():
        context.stop_as_expired()
    max_attempts = runtime.settings.max_attempts
    if attempt > max_attempts:
        reason = f"delivered {attempt} times without finishing (its worker was lost each time)"
        context.dead_letter(args[0], reason, attempt)
        raise JobFailedError(ErrorCode.WORKER_LOST.value, reason, {"dead_lettered": True, "attempts": attempt})
    resident = runtime.model(request.model, kind)
    runtime.job_started(context.job_id)
    try:
        return execute(resident, request, context).model_dump(mode="json")
    except inference.Cancelled:
        context.stop_as_cancelled()
    except (JobFailedError, Ignore):
        raise
    except Exception as exc:  # noqa: BLE001 - any model error fails this job only
        log.exception("job %s failed in model %s (attempt %d)", context.job_id, request.model, attempt)
        code = ErrorCode.OUT_OF_MEMORY if "out of memory" in str(exc).lower() else ErrorCode.MODEL_ERROR
        message = f"{type(exc).__name__}: {exc}"
        if attempt < max_attempts:
            raise task.retry(countdown=min(2 ** attempt, 30), max_retries=None, exc=exc)
        context.dead_letter(args[0], message, attempt)
        raise JobFailedError(code.value, message, {"dead_lettered": True, "attempts": attempt}) from None
    finally:
        runtime.job_finished(context.job_id)


@app.task(name=TASK_EMBED, bind=True, throws=(JobFailedError,), Request=FleetRequest)
def embed_task(self, *args, **kwargs) -> dict:
    """Embed texts with a resident encoder (payload: ``EmbedRequest``; result: ``EmbedResult``)."""
    return run_job(self, ModelKind.EMBED, EmbedRequest, args, kwargs, inference.embed)


@app.task(name=TASK_CLASSIFY, bind=True, throws=(JobFailedError,), Request=FleetRequest)
def classify_task(self, *args, **kwargs) -> dict:
    """Classify texts or feature vectors (payload: ``ClassifyRequest``; result: ``ClassifyResult``)."""
    return run_job(self, ModelKind.CLASSIFY, ClassifyRequest, args, kwargs, inference.classify)


@app.task(name=TASK_GENERATE, bind=True, throws=(JobFailedError,), Request=FleetRequest)
def generate_task(self, *args, **kwargs) -> dict:
    """Generate text with a resident causal LM (payload: ``GenerateRequest``; result: ``GenerateResult``)."""
    return run_job(self, ModelKind.GENERATE, GenerateRequest, args, kwargs, inference.generate)
