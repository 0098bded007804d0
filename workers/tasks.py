"""Celery tasks: thin wrappers that validate a payload, run it, and return a contract result.

Every failure a payload can cause becomes a ``JobFailedError`` with an ``ErrorCode``: the
job ends in FAILURE with a structured error and the worker keeps serving.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from celery.exceptions import Ignore
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
from workers import inference
from workers import runtime as runtime_module
from workers.app import app

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
    if len(json.dumps(payload)) > Limits.MAX_PAYLOAD_BYTES:
        raise JobFailedError(ErrorCode.INVALID_INPUT.value, f"payload exceeds {Limits.MAX_PAYLOAD_BYTES} bytes")
    version = payload.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise JobFailedError(ErrorCode.UNSUPPORTED_PROTOCOL.value,
                             f"protocol version {version!r} not supported (this worker speaks {PROTOCOL_VERSION})")
    try:
        return request_cls.model_validate(payload)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise JobFailedError(ErrorCode.INVALID_INPUT.value, f"invalid {request_cls.__name__}",
                             {"errors": errors}) from None


@dataclass
class JobContext:
    """What a running job may ask of its task: cancellation and streaming output."""

    task: Any

    @property
    def job_id(self) -> str:
        return self.task.request.id

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
    """Validate, check cancellation, run ``execute(resident_model, request, context)``; return JSON."""
    runtime = runtime_module.current()
    request = parse_payload(request_cls, args, kwargs)
    context = JobContext(task)
    if context.cancelled():
        context.stop_as_cancelled()
    resident = runtime.model(request.model, kind)
    runtime.job_started()
    try:
        return execute(resident, request, context).model_dump(mode="json")
    except inference.Cancelled:
        context.stop_as_cancelled()
    except (JobFailedError, Ignore):
        raise
    except Exception as exc:  # noqa: BLE001 - any model error fails this job only
        log.exception("job %s failed in model %s", context.job_id, request.model)
        code = ErrorCode.OUT_OF_MEMORY if "out of memory" in str(exc).lower() else ErrorCode.MODEL_ERROR
        raise JobFailedError(code.value, f"{type(exc).__name__}: {exc}") from None
    finally:
        runtime.job_finished()


@app.task(name=TASK_EMBED, bind=True, throws=(JobFailedError,))
def embed_task(self, *args, **kwargs) -> dict:
    """Embed texts with a resident encoder (payload: ``EmbedRequest``; result: ``EmbedResult``)."""
    return run_job(self, ModelKind.EMBED, EmbedRequest, args, kwargs, inference.embed)


@app.task(name=TASK_CLASSIFY, bind=True, throws=(JobFailedError,))
def classify_task(self, *args, **kwargs) -> dict:
    """Classify texts or feature vectors (payload: ``ClassifyRequest``; result: ``ClassifyResult``)."""
    return run_job(self, ModelKind.CLASSIFY, ClassifyRequest, args, kwargs, inference.classify)


@app.task(name=TASK_GENERATE, bind=True, throws=(JobFailedError,))
def generate_task(self, *args, **kwargs) -> dict:
    """Generate text with a resident causal LM (payload: ``GenerateRequest``; result: ``GenerateResult``)."""
    return run_job(self, ModelKind.GENERATE, GenerateRequest, args, kwargs, inference.generate)
