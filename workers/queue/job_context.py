"""What a running job asks of Redis: its start, attempts, deadline, cancellation, streaming, dead letters.

**The start round trip.** When a job starts, one pipelined round trip, grouped with the
other jobs starting at the same moment (workers/queue/group_commit.py), does everything:

* ``SET celery-task-meta-<id> <STARTED> NX EX <ttl>``: marks the job running unless a state
  is already stored. On a first delivery nothing is, unless the client marked the job
  ``REVOKED`` first (its deadline passed while it waited, or it was cancelled while queued):
  then the job is not computed;
* ``ZREM fleet:pending <id>`` (merged with the other jobs' into one command) and ``HDEL`` of
  the request copy in the job record: the message reached a worker, so the delivery sweeper
  has nothing to re-send;
* ``EXISTS fleet:cancel:<id>``: cancelled before it started.

A redelivered job (its worker died, or it was handed back) or a retried one also reads its
stored state (a SUCCESS is never computed again) and its crash record
``fleet:crash:<id>`` (below), in a second round trip that only those jobs pay.

**Attempts** (docs/RELIABILITY.md). A delivery is not an attempt: a job handed back unstarted,
or held by a worker that died while the job waited, costs nothing. An attempt is a run that
failed in the model (Celery's ``retries`` count those) or that crashed the device process:
the launcher reads which jobs the dead device was computing from the group's status board
and, if the batch held one job, charges it (``charges`` in ``fleet:crash:<id>``); if it held
several, it marks them all ``suspect`` without charging any, and a suspect runs alone in
its next batch, so that a job that crashes its worker is found and only it is charged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, NoReturn

from celery import states
from celery.exceptions import Ignore
from celery.utils.time import maybe_iso8601

from producer import keys
from producer.contract import Limits
from workers.observability import telemetry
from workers.queue.dlq import dead_letter
from workers.queue.group_commit import GroupCommit
from workers.queue.results import first_delivery, result_ttl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Start:
    """What the start round trip found."""

    #: False: the job already has a final state (finished before, or revoked by its client): do nothing.
    proceed: bool
    cancelled: bool = False
    #: Device crashes this job alone was in compute for.
    crash_charges: int = 0
    #: It shared a batch with a crash: run it alone.
    suspect: bool = False


class JobContext:
    """One running job's view of Redis and of its message (``task`` is the bound Celery task)."""

    def __init__(self, task: Any):
        self.task = task
        self.job_id: str = task.request.id
        self.isolate = False

    @property
    def redis(self):
        return self.task.backend.client

    @cached_property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` of this job's span (None without telemetry), for the device's batch span;
        read once, at the first use."""
        return telemetry.current_traceparent()

    # --- start -------------------------------------------------------------------------------

    def start(self, starts: GroupCommit) -> Start:
        """The start round trip (see the module docstring); ``starts`` groups it with other jobs'."""
        backend, request = self.task.backend, self.task.request
        meta_key = backend.get_key_for_task(self.job_id)
        started = backend.encode({**backend._get_result_meta({"pid": os.getpid(), "hostname": request.hostname},
                                                           states.STARTED, None, request),
                                  "task_id": self.job_id})
        ttl = result_ttl(request, backend.expires)
        cancel_key = keys.cancel_flag(self.job_id)
        if first_delivery(request):
            marked, cancelled, _ = starts.execute(
                lambda pipe: pipe.set(meta_key, started, nx=True, ex=ttl).exists(cancel_key)
                .hdel(keys.job_record(self.job_id), "request"),
                merge={("zrem", keys.PENDING): [self.job_id]})
            if marked:
                return Start(proceed=True, cancelled=bool(cancelled))
        stored, crash, cancelled = starts.execute(
            lambda pipe: pipe.get(meta_key).hgetall(keys.crash_record(self.job_id)).exists(cancel_key),
            merge={("zrem", keys.PENDING): [self.job_id]})
        if stored is not None and backend.decode_result(stored).get("status") in states.READY_STATES:
            log.info("job %s already has a final state; not computing it again", self.job_id)
            return Start(proceed=False)
        self.redis.set(meta_key, started, ex=ttl)
        crash = {key.decode(): value.decode() for key, value in (crash or {}).items()}
        return Start(proceed=True, cancelled=bool(cancelled), crash_charges=int(crash.get("charges", 0)),
                     suspect=crash.get("suspect") == "1")

    # --- deadline and cancellation -----------------------------------------------------------

    def deadline(self) -> datetime | None:
        """The job's deadline (Celery ``expires``), timezone-aware; None if it has none."""
        expires = self.task.request.expires
        if not expires:
            return None
        # Celery's own ISO 8601 parser (dateutil): it accepted this header, and it takes forms that
        # datetime.fromisoformat refuses ("2030-01", "2030-01-01T24:00").
        deadline = maybe_iso8601(expires) if isinstance(expires, str) else expires
        if deadline.tzinfo is None:  # ISO 8601 without an offset: UTC, as Celery reads it (enable_utc)
            deadline = deadline.replace(tzinfo=UTC)
        return deadline

    def expired(self) -> bool:
        """True if the job's deadline has passed."""
        deadline = self.deadline()
        return deadline is not None and datetime.now(UTC) >= deadline

    @property
    def priority(self) -> int:
        """The message's priority, 0 (first) to 9; 0 when it has none."""
        return int((self.task.request.delivery_info or {}).get("priority") or 0)

    def stop_as_expired(self) -> NoReturn:
        """Store REVOKED("expired"), as Celery does for jobs it drops at receipt, and end the task."""
        self.task.backend.mark_as_revoked(self.job_id, reason="expired", request=self.task.request)
        raise Ignore()

    def cancelled(self) -> bool:
        """True once ``handle.cancel()`` was called for this job (one EXISTS)."""
        return bool(self.job_id) and bool(self.redis.exists(keys.cancel_flag(self.job_id)))

    def stop_as_cancelled(self) -> NoReturn:
        """Store REVOKED for this job and end the task without a result (the message is acked)."""
        self.task.backend.mark_as_revoked(self.job_id, reason="cancelled", request=self.task.request)
        raise Ignore()

    # --- dead letters and streams ------------------------------------------------------------

    def dead_letter(self, payload: Any, reason: str, attempt: int) -> None:
        """Move the job to the dead-letter list with ``reason``."""
        queue = (self.task.request.delivery_info or {}).get("routing_key", "")
        dead_letter(self.redis, self.job_id, task=self.task.name, queue=queue, payload=payload, reason=reason,
                    attempts=attempt)
        log.error("job %s dead-lettered after %d attempt(s): %s", self.job_id, attempt, reason)

    def publish_piece(self, piece: str | None) -> None:
        """Append a piece of streamed output; ``None`` marks the end of the stream."""
        stream = keys.token_stream(self.job_id)
        fields = {"done": "1"} if piece is None else {"piece": piece}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(stream, fields, maxlen=Limits.MAX_NEW_TOKENS + 16, approximate=True)
            pipe.expire(stream, result_ttl(self.task.request, self.task.backend.expires))
            pipe.execute()
