"""Typed exceptions raised to producer code.

``JobFailedError`` is also the exception a worker raises to fail a job: Celery stores it
as ``{"exc_type": "JobFailedError", "exc_module": "producer.errors",
"exc_message": [code, message, details]}`` (see docs/PROTOCOL.md), and the client
rebuilds it from that.
"""

from __future__ import annotations

from typing import Any

from producer.contract.common import ErrorCode, JobError


class FleetError(Exception):
    """Base of every error Fleet raises to its caller."""


class InvalidRequest(FleetError, ValueError):
    """The request failed validation in the client; nothing was enqueued.

    ``errors`` lists pydantic-style error dicts (``loc``, ``msg``, ``type``).
    """

    code = ErrorCode.INVALID_INPUT

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.errors = errors or []


class UnknownModel(InvalidRequest):
    """The requested model is not in the fleet's catalog; nothing was enqueued."""

    code = ErrorCode.UNKNOWN_MODEL


class WrongModelKind(InvalidRequest):
    """The model exists but serves another kind of job; nothing was enqueued."""

    code = ErrorCode.WRONG_MODEL_KIND


class JobFailedError(FleetError):
    """A job ended in FAILURE. ``error`` is the structured error the worker stored.

    Constructed with positional ``(code, message, details)`` so that Celery's JSON
    exception round trip (``exc_message`` is the args list) rebuilds it exactly.
    """

    def __init__(self, code: str, message: str = "", details: dict[str, Any] | None = None):
        super().__init__(code, message, details or {})
        self.error = JobError(code=ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL,
                              message=message, details=details or {})

    @property
    def code(self) -> ErrorCode:
        return self.error.code

    def __str__(self) -> str:
        return f"[{self.error.code.value}] {self.error.message}"


class JobCancelled(FleetError):
    """The job was cancelled before it produced a result."""


class JobTimeout(FleetError, TimeoutError):
    """No result arrived within the caller's timeout; the job may still finish later."""


class QueueFull(FleetError):
    """The target queue holds ``max_queue_depth`` jobs or more; nothing was enqueued.

    Raised at once, or after waiting up to the caller's ``block_s`` for room.
    """

    def __init__(self, queue: str, depth: int, limit: int):
        super().__init__(f"queue {queue} holds {depth} jobs (limit {limit}); try later or raise FLEET_MAX_QUEUE_DEPTH")
        self.queue, self.depth, self.limit = queue, depth, limit


class JobExpired(FleetError):
    """The job's deadline passed before a worker started it; it was not computed."""
