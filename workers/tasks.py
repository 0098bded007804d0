"""Celery tasks: thin wrappers that validate a payload, run it, and return a contract result.

Every failure a payload can cause becomes a ``JobFailedError`` with an ``ErrorCode``: the
job ends in FAILURE with a structured error and the worker keeps serving.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from celery.exceptions import Ignore
from pydantic import BaseModel, ValidationError

from producer import keys
from producer.contract import (
    PROTOCOL_VERSION,
    TASK_EMBED,
    EmbedRequest,
    ErrorCode,
    Limits,
    ModelKind,
)
from producer.errors import JobFailedError
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


def run_job(task, kind: ModelKind, request_cls: type[BaseModel], args: tuple, kwargs: dict,
            execute: Callable[[Any, BaseModel], BaseModel]) -> dict:
    """Validate, check cancellation, run ``execute(resident_model, request)``; return the result as JSON."""
    runtime = runtime_module.current()
    request = parse_payload(request_cls, args, kwargs)
    raise_if_cancelled(task)
    resident = runtime.model(request.model, kind)
    runtime.job_started()
    try:
        return execute(resident, request).model_dump(mode="json")
    except JobFailedError:
        raise
    except Exception as exc:  # noqa: BLE001 - any model error fails this job only
        log.exception("job %s failed in model %s", task.request.id, request.model)
        code = ErrorCode.OUT_OF_MEMORY if "out of memory" in str(exc).lower() else ErrorCode.MODEL_ERROR
        raise JobFailedError(code.value, f"{type(exc).__name__}: {exc}") from None
    finally:
        runtime.job_finished()


def raise_if_cancelled(task) -> None:
    """Stop here if the job was cancelled: store REVOKED and end without computing."""
    job_id = task.request.id
    if job_id and task.backend.client.exists(keys.cancel_flag(job_id)):
        task.backend.mark_as_revoked(job_id, reason="cancelled", request=task.request)
        raise Ignore()


def _execute_embed(resident, request: EmbedRequest):
    from workers.inference import embed

    return embed(resident, request)


@app.task(name=TASK_EMBED, bind=True, throws=(JobFailedError,))
def embed_task(self, *args, **kwargs) -> dict:
    """Embed texts with a resident encoder (payload: ``EmbedRequest``; result: ``EmbedResult``)."""
    return run_job(self, ModelKind.EMBED, EmbedRequest, args, kwargs, _execute_embed)
