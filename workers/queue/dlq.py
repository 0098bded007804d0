"""The dead-letter list: jobs that failed or lost their worker too often, kept with the reason.

Entries live in the Redis hash ``fleet:dlq`` (job id -> JSON). ``fleet dlq`` lists, shows,
retries (same job id, so existing handles see the new result) and purges them.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from producer import keys


def dead_letter(client: redis.Redis, job_id: str, *, task: str, queue: str, payload: Any, reason: str,
                attempts: int, message: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record a dead job; return the entry written.

    ``payload`` is the request object (None when none could be read); ``message``, for a message the
    worker refused (``invalid_message``), describes its framing and the start of its body.
    """
    entry = {"job_id": job_id, "task": task, "queue": queue, "payload": payload, "reason": reason,
             "attempts": attempts, "at": time.time()}
    if message is not None:
        entry["message"] = message
    client.hset(keys.DEAD_LETTERS, job_id, json.dumps(entry))
    return entry


def list_entries(client: redis.Redis) -> list[dict[str, Any]]:
    """All dead-letter entries, oldest first."""
    entries = [json.loads(raw) for raw in client.hvals(keys.DEAD_LETTERS)]
    return sorted(entries, key=lambda entry: entry["at"])


def get_entry(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = client.hget(keys.DEAD_LETTERS, job_id)
    return json.loads(raw) if raw else None


class NotRetriable(ValueError):
    """The entry records a message that named no task, queue or request: there is nothing to send again."""


def retry(client: redis.Redis, celery_app, job_id: str) -> bool:
    """Send a dead job again under its own id, with a fresh attempt count; False if unknown.

    Raises ``NotRetriable`` (and keeps the entry) for a refused message from which no task, queue
    or request object could be read.
    """
    entry = get_entry(client, job_id)
    if entry is None:
        return False
    if entry["payload"] is None or not entry["task"] or not entry["queue"]:
        raise NotRetriable(f"dead-letter entry {job_id} has no task, queue or request to send again "
                           f"({entry['reason']}); see it with: fleet dlq show {job_id}")
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(keys.crash_record(job_id), f"celery-task-meta-{job_id}")
        pipe.hdel(keys.DEAD_LETTERS, job_id)
        pipe.execute()
    celery_app.send_task(entry["task"], args=[entry["payload"]], task_id=job_id, queue=entry["queue"])
    return True


def purge(client: redis.Redis) -> int:
    """Remove every entry; return how many there were."""
    count = client.hlen(keys.DEAD_LETTERS)
    client.delete(keys.DEAD_LETTERS)
    return count
