"""Raw kombu messages, as any producer could send them: body bytes, content type, encoding and headers as given."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from kombu import Connection, Exchange, Producer

from producer import keys
from producer.contract import TASK_EMBED

#: A protocol-2 body for one valid embed job, as Celery would send it.
GOOD_EMBED_BODY = json.dumps([[{"texts": ["a raw message"]}], {},
                              {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


def task_headers(job_id: str | None = None, task: Any = TASK_EMBED) -> dict[str, Any]:
    """Celery protocol-2 headers naming ``task`` and the job ``job_id`` (a fresh id when None)."""
    job_id = job_id or str(uuid.uuid4())
    return {"lang": "py", "task": task, "id": job_id, "root_id": job_id, "argsrepr": "", "kwargsrepr": ""}


class RawSender:
    """One broker connection that publishes raw messages to Fleet queues (exchange and routing key: the queue)."""

    def __init__(self, redis_url: str):
        self.connection = Connection(redis_url)
        self.channel = self.connection.channel()

    def publish(self, queue: str, body: bytes, *, content_type: str | None, content_encoding: str | None = "utf-8",
                headers: dict[str, Any] | None = None) -> None:
        Producer(self.channel, exchange=Exchange(queue, type="direct"), routing_key=queue).publish(
            body, content_type=content_type, content_encoding=content_encoding, headers=headers or {})

    def close(self) -> None:
        self.channel.close()
        self.connection.release()


def final_meta(client: redis.Redis, job_id: str, timeout_s: float = 30.0) -> dict | None:
    """The stored result of ``job_id`` once it is final (SUCCESS, FAILURE or REVOKED), else None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = client.get(f"celery-task-meta-{job_id}")
        if raw is not None and json.loads(raw)["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return json.loads(raw)
        time.sleep(0.02)
    return None


def dead_letter(client: redis.Redis, entry_id: str) -> dict | None:
    """The dead-letter entry ``entry_id`` (``fleet:dlq``), or None."""
    raw = client.hget(keys.DEAD_LETTERS, entry_id)
    return json.loads(raw) if raw else None
