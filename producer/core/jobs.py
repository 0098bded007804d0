"""Jobs as the client publishes them: ids, the job record, the idempotency fingerprint, headers. No I/O.

Job ids. Each client draws a random 8-hex-digit prefix; every job id it generates is a UUID
string whose first 8 hex digits are that prefix. One pattern subscription
(``celery-task-meta-<prefix>*``) then brings the client every result of its own jobs
(``producer/core/router.py``). Caller-supplied ids (``job_id=``/``job_ids=``) match
``JOB_ID_PATTERN`` and are checked for reuse in Redis when published.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from producer.core.options import SubmitOptions
from producer.core.requests import task_for
from producer.errors import InvalidRequestError, JobIdConflictError

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

#: Celery's Redis result backend stores a job's result meta under this prefix + job id, and
#: publishes every state it stores on the pub/sub channel of the same name.
RESULT_KEY_PREFIX = "celery-task-meta-"
#: Message header: seconds the job's result is kept after it finishes (docs/PROTOCOL.md).
HEADER_RESULT_TTL = "fleet_result_ttl_s"
#: Hex digits of a client's job id prefix.
PREFIX_DIGITS = 8


def result_key(job_id: str) -> str:
    """The Redis key (and pub/sub channel) of ``job_id``'s result."""
    return f"{RESULT_KEY_PREFIX}{job_id}"


def job_id_of(key: bytes | str) -> str:
    """The job id in a result key or channel name."""
    text = key.decode() if isinstance(key, bytes) else key
    return text[len(RESULT_KEY_PREFIX):]


def new_client_prefix() -> str:
    """A random prefix of ``PREFIX_DIGITS`` lower-case hex digits for one client's job ids."""
    return secrets.token_hex(PREFIX_DIGITS // 2)


def connection_name(prefix: str) -> str:
    """The name (``CLIENT SETNAME``) of the Redis connections a client publishes on; those it waits on
    carry this name plus ``-wait``. ``CLIENT LIST`` and ``MONITOR`` then tell each client's share."""
    return f"fleet-producer-{prefix}"


def new_job_id(prefix: str) -> str:
    """A fresh UUID string (version 4) whose first ``PREFIX_DIGITS`` hex digits are ``prefix``."""
    return str(uuid.UUID(prefix + uuid.uuid4().hex[PREFIX_DIGITS:]))


def request_fingerprint(kind: str, request: BaseModel) -> str:
    """SHA-256 of the job's kind and request as canonical JSON: what an idempotency key is bound to.

    Submission options (priority, deadline, ...) are not part of it: a retry of the same request
    with another deadline is the same request.
    """
    canonical = json.dumps({"kind": kind, "request": request.model_dump(mode="json")}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class JobPlan:
    """Everything needed to publish one job and to follow it afterwards."""

    job_id: str
    kind: str
    queue: str
    request: BaseModel
    priority: int
    #: The deadline: not started after it (UTC); None for no deadline.
    expires: datetime | None
    result_ttl_s: int | None
    idempotency_key: str | None
    #: The caller chose the id: it must be checked for reuse (a generated one is unique by construction).
    chosen_id: bool = False

    @property
    def task(self) -> str:
        return task_for(self.kind)

    @property
    def streams(self) -> bool:
        return bool(getattr(self.request, "stream", False))

    @property
    def expires_at(self) -> float | None:
        """The deadline as UNIX time (s), or None."""
        return None if self.expires is None else self.expires.timestamp()

    def payload(self) -> dict[str, Any]:
        """The task's one positional argument (JSON)."""
        return self.request.model_dump(mode="json")

    def headers(self) -> dict[str, Any]:
        """Fleet's message headers beyond Celery's own (``HEADER_RESULT_TTL`` when asked)."""
        return {HEADER_RESULT_TTL: self.result_ttl_s} if self.result_ttl_s is not None else {}

    def fingerprint(self) -> str:
        return request_fingerprint(self.kind, self.request)

    def record(self, submitted_at: float) -> dict[FieldT, EncodableT]:
        """The ``keys.job_record`` hash written for the job.

        ``task``, ``priority``, ``expires``, ``result_ttl_s`` and ``request`` let the delivery sweeper send
        the job again if its message is lost on the way to a worker; the worker drops ``request`` when
        the job starts.
        """
        return {"kind": self.kind, "model": getattr(self.request, "model", ""), "queue": self.queue,
                "submitted_at": submitted_at, "stream": "1" if self.streams else "0", "task": self.task,
                "priority": self.priority, "expires": self.expires.isoformat() if self.expires else "",
                "result_ttl_s": self.result_ttl_s or "", "request": self.request.model_dump_json()}


def plan_jobs(kind: str, requests: Sequence[BaseModel], queues: Sequence[str], options: SubmitOptions,
              prefix: str, now: float) -> list[JobPlan]:
    """One ``JobPlan`` per request (``queues[i]`` is request i's queue), with ids and the deadline set.

    Raises ``InvalidRequestError`` when ``job_ids`` does not match the requests one to one and
    ``JobIdConflictError`` when an id appears twice.
    """
    job_ids = _job_ids(len(requests), options, prefix)
    chosen = options.job_id is not None or options.job_ids is not None
    expires = None if options.deadline_s is None else datetime.fromtimestamp(now + options.deadline_s, UTC)
    return [JobPlan(job_id=job_id, kind=kind, queue=queue, request=request, priority=options.priority,
                    expires=expires, result_ttl_s=options.result_ttl_s, idempotency_key=options.idempotency_key,
                    chosen_id=chosen)
            for job_id, request, queue in zip(job_ids, requests, queues)]


def _job_ids(count: int, options: SubmitOptions, prefix: str) -> list[str]:
    given = options.job_ids if options.job_ids is not None else (
        [options.job_id] if options.job_id is not None else None)
    if given is None:
        return [new_job_id(prefix) for _ in range(count)]
    if len(given) != count:
        raise InvalidRequestError(f"{len(given)} job ids for {count} requests",
                                  [{"loc": ["job_ids"], "msg": "one id per request", "type": "length"}])
    seen: set[str] = set()
    for job_id in given:
        if job_id in seen:
            raise JobIdConflictError(job_id, "twice in this submission")
        seen.add(job_id)
    return list(given)
