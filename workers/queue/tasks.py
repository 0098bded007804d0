"""Celery tasks: thin wrappers that start a job, validate its payload, run it, and return a contract result.

Every failure a payload can cause becomes a ``JobFailedError`` with an ``ErrorCode``: the
job ends in FAILURE with a structured error and the worker keeps serving. A job whose
device process died before answering is handed back to its queue uncharged (``Reject`` with
requeue); the attempt rule is in workers/queue/job_context.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from celery.exceptions import Ignore, Reject
from celery.utils.time import maybe_iso8601
from celery.worker.request import Request
from pydantic import BaseModel, ValidationError

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
from workers.queue.app import app
from workers.queue.group_commit import GroupCommit
from workers.queue.job_context import JobContext, Start
from workers.serving import inference
from workers.serving import runtime as runtime_module
from workers.serving.device_client import DeviceLost

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=BaseModel)
#: The request of an inference task (each names its ``model``).
InferenceRequestT = TypeVar("InferenceRequestT", EmbedRequest, ClassifyRequest, GenerateRequest)


def parse_payload(request_cls: type[RequestT], args: tuple, kwargs: dict) -> RequestT:
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

    Celery trusts these: a ``timelimit`` that is not a pair of numbers or ``stamped_headers`` that is not a
    list raises inside the consumer and kills the worker (and every worker the unacked message goes to
    next); an ``eta``/``expires`` that is not ISO 8601 makes Celery discard the message with no result.
    (A message without a usable ``id`` never gets here: ``workers/queue/wire_guard.py`` refuses it.)
    """
    bad: dict[str, str] = {}

    def drop(name: str, replacement: Any) -> None:
        bad[name] = repr(headers[name])[:200]
        headers[name] = replacement

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


#: The start round trips of this process's jobs, grouped (workers/queue/group_commit.py).
_starts: GroupCommit | None = None


def starts() -> GroupCommit:
    global _starts
    if _starts is None:
        _starts = GroupCommit(lambda: app.backend.client)
    return _starts


#: An inference function: ``execute(runtime, request, context)`` returns the JSON-ready result.
Execute = Callable[[Any, InferenceRequestT, JobContext], dict[str, Any]]


def begin(task) -> tuple[JobContext, Start]:
    """Start the job (one grouped round trip) and end the task at once if it must not run:
    it already has a final state, was cancelled, or is past its deadline."""
    context = JobContext(task)
    start = context.start(starts())
    if not start.proceed:
        raise Ignore()
    if start.cancelled:
        context.stop_as_cancelled()
    if context.expired():
        context.stop_as_expired()
    context.isolate = start.suspect
    return context, start


def refuse_crashed_too_often(context: JobContext, start: Start, payload: Any, max_attempts: int) -> int:
    """This run's attempt number; a job that crashed its worker ``max_attempts`` times is dead-lettered."""
    attempt = 1 + context.task.request.retries + start.crash_charges
    if start.crash_charges and attempt > max_attempts:
        reason = (f"its worker's device process died {start.crash_charges} time(s) while computing this job "
                  f"alone; not run again")
        context.dead_letter(payload, reason, attempt - 1)
        raise JobFailedError(ErrorCode.WORKER_LOST.value, reason,
                             {"dead_lettered": True, "attempts": attempt - 1})
    return attempt


def run_job(task, kind: ModelKind, request_cls: type[InferenceRequestT], args: tuple, kwargs: dict,
            execute: Execute[InferenceRequestT]) -> dict[str, Any]:
    """Start, validate, run ``execute(runtime, request, context)`` and return its JSON-ready result.

    A run the model fails is retried (backoff) until the job has had ``max_attempts`` attempts,
    then dead-lettered. A job whose device process died is handed back (``Reject``, requeued).
    """
    runtime = runtime_module.current()
    context, start = begin(task)
    refuse_bad_headers(task)
    request = parse_payload(request_cls, args, kwargs)
    max_attempts = runtime.settings.max_attempts
    attempt = refuse_crashed_too_often(context, start, args[0], max_attempts)
    runtime.job_started(context.job_id)
    try:
        runtime.model(request.model, kind)  # ModelRetired (a DeviceLost): its model left this worker
        return execute(runtime, request, context)
    except inference.Cancelled:
        context.stop_as_cancelled()
    except inference.Expired:
        context.stop_as_expired()
    except DeviceLost as exc:
        log.warning("job %s: %s; handing the job back to its queue", context.job_id, exc)
        raise Reject("device process lost", requeue=True) from None
    except (JobFailedError, Ignore):
        raise
    except Exception as exc:
        code = exc.code if isinstance(exc, inference.ModelFailed) else ErrorCode.MODEL_ERROR.value
        message = str(exc) if isinstance(exc, inference.ModelFailed) else f"{type(exc).__name__}: {exc}"
        log.error("job %s failed in model %s (attempt %d): %s", context.job_id, request.model, attempt, message)
        if attempt < max_attempts:
            raise task.retry(countdown=min(2 ** attempt, 30), max_retries=None, exc=exc) from exc
        context.dead_letter(args[0], message, attempt)
        raise JobFailedError(code, message, {"dead_lettered": True, "attempts": attempt}) from None
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
