"""Every error Fleet raises to its caller, under one root: ``FleetError``.

Names end in ``Error``. Each error that has a stable machine-readable reason carries it as
``.code`` (an ``ErrorCode``); the others have ``code = None``.

| error | raised when | nothing was enqueued? |
|---|---|---|
| ``InvalidRequestError`` | a request or a submission option failed validation | yes |
| ``UnknownModelError``, ``WrongModelKindError`` | the model is not in the catalog / serves another kind | yes |
| ``IdempotencyConflictError`` | the idempotency key is bound to a different request | yes |
| ``JobIdConflictError`` | a caller-supplied job id is already in use | yes |
| ``ModelUnavailableError`` | no live worker serves the model (and the caller did not opt in to wait) | yes |
| ``QueueFullError`` | the queue is at ``max_queue_depth`` | yes |
| ``NoMatchingWorkerError`` | a model command found no live worker to go to | nothing was sent |
| ``FleetConnectionError`` | Redis cannot be reached or refused the credentials | yes, but see ``sent_job_ids`` |
| ``RedisCommandError`` | Redis refused a command (ACL, memory, key type) | yes, but see ``sent_job_ids`` |
| ``RedisURLError`` | ``REDIS_URL`` cannot be used as given | yes |
| ``JobFailedError`` | the job ended in FAILURE on a worker | - |
| ``JobCancelledError``, ``JobExpiredError`` | the job was cancelled / passed its deadline unstarted | - |
| ``JobTimeoutError`` | a wait ran out before the job finished (the job may still finish) | - |

``JobFailedError`` is also the exception a worker raises to fail a job: Celery stores it as
``{"exc_type": "JobFailedError", "exc_module": "producer.errors", "exc_message": [code, message,
details]}`` (see docs/PROTOCOL.md), and the client rebuilds it from that.

The names without ``Error`` (``InvalidRequest``, ``UnknownModel``, ``WrongModelKind``,
``JobCancelled``, ``JobExpired``, ``JobTimeout``, ``QueueFull``) are aliases of the same classes,
kept because programs and the worker code written against the first release import them; an
``except InvalidRequest`` and an ``except InvalidRequestError`` catch the same errors. New code
uses the ``Error`` names.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import AuthenticationError, AuthorizationError

from producer.contract.common import ErrorCode, JobError
from producer.urls import redacted_url


class FleetError(Exception):
    """Base of every error Fleet raises to its caller."""

    #: The stable reason, where one applies.
    code: ErrorCode | None = None


class InvalidRequestError(FleetError, ValueError):
    """The request or a submission option failed validation in the client; nothing was enqueued.

    ``errors`` lists pydantic-style error dicts (``loc``, ``msg``, ``type``).
    """

    code = ErrorCode.INVALID_INPUT

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.errors = errors or []


class UnknownModelError(InvalidRequestError):
    """The requested model is not in the fleet's catalog; nothing was enqueued."""

    code = ErrorCode.UNKNOWN_MODEL


class WrongModelKindError(InvalidRequestError):
    """The model exists but serves another kind of job; nothing was enqueued."""

    code = ErrorCode.WRONG_MODEL_KIND


class IdempotencyConflictError(InvalidRequestError):
    """The idempotency key was first used for a different request; nothing was enqueued.

    ``key`` is the caller's key, ``job_id`` the job it is bound to.
    """

    code = ErrorCode.IDEMPOTENCY_CONFLICT

    def __init__(self, key: str, job_id: str):
        super().__init__(f"idempotency key {key!r} was used for a different request (job {job_id}); "
                         "use a new key for a new request",
                         [{"loc": ["idempotency_key"], "msg": "bound to a different request",
                           "type": self.code.value}])
        self.key, self.job_id = key, job_id


class JobIdConflictError(InvalidRequestError):
    """A caller-supplied job id is already used by another job (queued, running or finished); nothing was enqueued."""

    code = ErrorCode.JOB_ID_CONFLICT

    def __init__(self, job_id: str, where: str = "in Redis"):
        super().__init__(f"job id {job_id!r} is already in use ({where}); job ids must be unique",
                         [{"loc": ["job_id"], "msg": "already in use", "type": self.code.value}])
        self.job_id = job_id


class ModelUnavailableError(FleetError):
    """No live worker serves ``model``; nothing was enqueued.

    ``last_seen`` is the UNIX time (s) of the last heartbeat of a worker that served it, or None if
    no worker ever announced it. Submit with ``wait_for_worker=True`` (or set
    ``FLEET_WAIT_FOR_WORKER=1``) to queue jobs until a worker starts (scale from zero).
    """

    code = ErrorCode.MODEL_UNAVAILABLE

    def __init__(self, model: str, last_seen: float | None, now: float):
        when = ("no worker has served it yet" if last_seen is None
                else f"a worker last served it {max(0.0, now - last_seen):.0f} s ago")
        super().__init__(f"no live worker serves model {model!r} ({when}); start a worker for it, or submit "
                         "with wait_for_worker=True to queue the job until one starts")
        self.model, self.last_seen = model, last_seen


class QueueFullError(FleetError):
    """The target queue holds ``max_queue_depth`` jobs or more; nothing was enqueued.

    Raised at once, or after waiting up to the caller's ``block_s`` for room.
    """

    def __init__(self, queue: str, depth: int, limit: int):
        super().__init__(f"queue {queue} holds {depth} jobs (limit {limit}); try later or raise FLEET_MAX_QUEUE_DEPTH")
        self.queue, self.depth, self.limit = queue, depth, limit


class NoMatchingWorkerError(FleetError):
    """A model lifecycle command (``client.models.load`` ...) found no live worker group to go to: none matches
    its ``workers`` selector, or, without one, none serves the model to unload or switch. Nothing was sent."""


class JobFailedError(FleetError):
    """A job ended in FAILURE. ``error`` is the structured error the worker stored.

    Constructed with positional ``(code, message, details)`` so that Celery's JSON
    exception round trip (``exc_message`` is the args list) rebuilds it exactly.
    """

    def __init__(self, code: str, message: str = "", details: dict[str, Any] | None = None):
        super().__init__(code, message, details or {})
        self.error = JobError(code=ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL,
                              message=message, details=details or {})
        self.code = self.error.code

    def __str__(self) -> str:
        return f"[{self.error.code.value}] {self.error.message}"


class JobCancelledError(FleetError):
    """The job was cancelled before it produced a result."""

    code = ErrorCode.CANCELLED


class JobExpiredError(FleetError):
    """The job's deadline passed before a worker started it; it was not computed."""

    code = ErrorCode.DEADLINE_EXCEEDED


class JobTimeoutError(FleetError, TimeoutError):
    """No result arrived within the caller's timeout; the job may still finish later."""


class FleetRedisError(FleetError):
    """Redis failed a command Fleet sent on the caller's behalf.

    ``url`` is the URL used, its password replaced by ``**``; ``cause`` is the underlying redis-py
    or kombu exception (also the ``__cause__``). When a submission of many jobs failed part-way,
    ``sent_job_ids`` lists those whose messages were sent all the same (they will run).
    """

    def __init__(self, url: str, cause: BaseException, what: str = "refused a command"):
        self.url = redacted_url(url)
        self.cause = cause
        self.sent_job_ids: list[str] = []
        super().__init__(f"Redis at {self.url} {what}: {type(cause).__name__}: {cause}")


class FleetConnectionError(FleetRedisError, ConnectionError):
    """Redis could not be reached, or refused the credentials."""

    def __init__(self, url: str, cause: BaseException):
        auth = isinstance(cause, (AuthenticationError, AuthorizationError))
        super().__init__(url, cause, "refused the credentials" if auth else "cannot be reached")


class RedisCommandError(FleetRedisError):
    """Redis answered but refused a command: a missing ACL permission, no memory left (``maxmemory``),
    a key of the wrong type. Nothing Fleet can retry; the message says which."""


class RedisURLError(FleetError, ValueError):
    """``REDIS_URL`` cannot be used as given (the message never contains the password)."""


# Aliases of the first release's names (see the module docstring).
InvalidRequest = InvalidRequestError
UnknownModel = UnknownModelError
WrongModelKind = WrongModelKindError
JobCancelled = JobCancelledError
JobExpired = JobExpiredError
JobTimeout = JobTimeoutError
QueueFull = QueueFullError
