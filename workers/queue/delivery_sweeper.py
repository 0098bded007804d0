"""Re-send jobs whose message was lost in delivery to a worker that died.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged with a
second command; a worker SIGKILLed between the two (the reply in flight, or unread in its
socket) takes the message with it: it is in no queue list and not in the ``unacked`` hash,
so the visibility timeout never brings it back (docs/RELIABILITY.md).

Fleet's client keeps what it needs to send a job again: every submission adds the job to the
sorted set ``keys.PENDING`` (score: submission time) and writes the task, queue, priority,
deadline and request into the job record; the worker removes the job from the set when its
first delivery starts (``workers.queue.job_context.JobContext.start``). So a job still pending
long after submission is either waiting in its queue, held by a worker that has not started
it (recorded in ``unacked``), or lost.

Every worker runs a ``DeliverySweeper`` thread; a Redis lock lets one of them sweep per
interval. A sweep takes the jobs pending for longer than ``grace_s``, and calls *missing*
those found in none of their queue's lists and not in ``unacked``. A job missing in two
sweeps in a row (``interval_s`` apart: far longer than a live worker takes between popping a
message and recording it) is sent again under its own id. If it was not lost after all, the
cost is a second delivery: a job that already succeeded is skipped (``run_job``), and Celery
never overwrites a stored ``SUCCESS``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, cast

import redis

from producer import keys
from producer.core.jobs import HEADER_RESULT_TTL
from producer.queues import priority_lists
from producer.redis_connection import text

log = logging.getLogger(__name__)

#: Most pending jobs one sweep examines (oldest first).
MAX_CANDIDATES = 1000
#: Messages read per LRANGE when a queue's lists are scanned.
SCAN_CHUNK = 1000
#: The kombu Redis transport's hash of delivered, unacknowledged messages.
UNACKED_HASH = "unacked"


def message_job_id(raw: bytes | str) -> str | None:
    """The task id in a kombu Redis message (``headers.id`` of its JSON envelope), or None."""
    try:
        envelope = json.loads(raw)
        if isinstance(envelope, list):  # the ``unacked`` hash stores [message, exchange, routing_key]
            envelope = envelope[0]
        return envelope["headers"]["id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def waiting_job_ids(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """Ids of every job waiting in any priority list of ``queues``."""
    found: set[str] = set()
    for queue in queues:
        for name in priority_lists(queue):
            start = 0
            while True:
                chunk = client.lrange(name, start, start + SCAN_CHUNK - 1)
                found.update(filter(None, map(message_job_id, chunk)))
                if len(chunk) < SCAN_CHUNK:
                    break
                start += SCAN_CHUNK
    return found


def unacked_job_ids(client: redis.Redis) -> set[str]:
    """Ids of every message a worker has recorded as delivered and not yet acknowledged."""
    return set(filter(None, (message_job_id(raw) for raw in client.hvals(UNACKED_HASH))))


class DeliverySweeper:
    """Finds jobs lost in delivery and sends them again; ``sweep_once`` is one pass.

    ``send(job_id, record)`` publishes the job again from its job record (a dict of str);
    ``interval_s``: seconds between sweeps, fleet-wide; ``grace_s``: how long after submission
    a job still waiting to start is examined at all.
    """

    def __init__(self, client: redis.Redis, send, *, owner: str, interval_s: float, grace_s: float):
        self.client = client
        self.send = send
        self.owner = owner
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> DeliverySweeper:
        self._thread = threading.Thread(target=self._run, name="delivery-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep_once()
            except redis.RedisError as exc:  # Redis restarting: try again next interval
                log.warning("delivery sweep skipped: %s", exc)

    def sweep_once(self) -> list[str]:
        """One pass (if no other worker holds this interval's lock); return the ids sent again."""
        if not self.client.set(keys.SWEEPER_LOCK, self.owner, nx=True, ex=max(1, int(self.interval_s * 0.9))):
            return []
        missing = self.missing_jobs()
        previous = {text(member) for member in self.client.smembers(keys.MISSING_JOBS)}
        confirmed = missing & previous
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(keys.MISSING_JOBS)
            if missing - confirmed:
                pipe.sadd(keys.MISSING_JOBS, *(missing - confirmed))
                pipe.expire(keys.MISSING_JOBS, int(self.interval_s * 3) + 1)
            pipe.execute()
        resent = []
        for job_id in sorted(confirmed):
            record = self._record(job_id)
            if record is None:
                continue
            self.send(job_id, record)
            self.client.zadd(keys.PENDING, {job_id: time.time()})
            log.warning("job %s was lost in delivery (in no queue, not unacked, never started); sent it again",
                        job_id)
            resent.append(job_id)
        return resent

    def missing_jobs(self) -> set[str]:
        """Jobs pending longer than the grace period that are in no queue list and not unacked."""
        cutoff = time.time() - self.grace_s
        candidates = [text(cast(bytes, member)) for member in
                      self.client.zrangebyscore(keys.PENDING, "-inf", cutoff, start=0, num=MAX_CANDIDATES)]
        if not candidates:
            return set()
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in candidates:
                pipe.hget(keys.job_record(job_id), "queue")
                pipe.exists(f"celery-task-meta-{job_id}")
            replies = pipe.execute()
        queues: dict[str, str] = {}
        settled = []
        for job_id, queue, has_result in zip(candidates, replies[::2], replies[1::2]):
            if queue is None or has_result:
                settled.append(job_id)  # record expired, or the job ended without starting (revoked, expired)
            else:
                queues[job_id] = queue.decode()
        if settled:
            self.client.zrem(keys.PENDING, *settled)
        if not queues:
            return set()
        present = waiting_job_ids(self.client, set(queues.values())) | unacked_job_ids(self.client)
        return {job_id for job_id in queues if job_id not in present}

    def _record(self, job_id: str) -> dict[str, str] | None:
        raw = self.client.hgetall(keys.job_record(job_id))
        record = {text(name): text(value) for name, value in raw.items()}
        if not {"task", "queue", "request"} <= record.keys():
            log.error("job %s looks lost but its record cannot re-send it: %s", job_id, sorted(record))
            self.client.zrem(keys.PENDING, job_id)
            return None
        return record


def resend_from_record(celery_app, job_id: str, record: dict[str, str]) -> None:
    """Publish the job described by ``record`` (``producer.core.jobs.JobPlan.record``) again, under ``job_id``."""
    headers: dict[str, Any] = {"fleet_enqueued_at": time.time(), "fleet_resent": True}
    if record.get("result_ttl_s"):
        headers[HEADER_RESULT_TTL] = int(record["result_ttl_s"])
    options: dict[str, Any] = {"task_id": job_id, "queue": record["queue"],
                               "priority": int(record.get("priority") or 0), "headers": headers}
    if record.get("expires"):
        options["expires"] = record["expires"]
    celery_app.send_task(record["task"], args=[json.loads(record["request"])], **options)
