"""Checks a job passes before it is published: backpressure and idempotency.

Both are one Redis round trip and run in the client; workers never see a job that failed them.
"""

from __future__ import annotations

import time

import redis

from producer import keys
from producer.errors import QueueFull
from producer.queues import queue_depth
from producer.redis_connection import text

#: How often a blocked submission re-checks the queue depth, in seconds.
BACKPRESSURE_POLL_S = 0.05


def wait_for_room(client: redis.Redis, queue: str, max_depth: int, block_s: float = 0.0, incoming: int = 1) -> None:
    """Return once ``queue`` has room for ``incoming`` more jobs; raise ``QueueFull`` otherwise.

    ``max_depth`` 0 disables the check. With ``block_s`` > 0, waits up to that many seconds.
    """
    if max_depth <= 0:
        return
    deadline = time.monotonic() + block_s
    while True:
        depth = queue_depth(client, queue)
        if depth + incoming <= max_depth:
            return
        if time.monotonic() >= deadline:
            raise QueueFull(queue, depth, max_depth)
        time.sleep(BACKPRESSURE_POLL_S)


def claim_idempotency_key(client: redis.Redis, key: str, job_id: str, window_s: int) -> str | None:
    """Bind ``key`` to ``job_id`` for ``window_s`` seconds unless already bound.

    Returns None if this call claimed the key (submit the job), else the job id it is bound to
    (return that job instead of submitting). Atomic: ``SET NX``.
    """
    if client.set(keys.idempotency(key), job_id, nx=True, ex=window_s):
        return None
    existing = client.get(keys.idempotency(key))
    return text(existing) if existing else None


def release_idempotency_key(client: redis.Redis, key: str, job_id: str) -> None:
    """Unbind ``key`` if it is still bound to ``job_id`` (its publish failed: a retry may use the key)."""
    bound = keys.idempotency(key)
    with client.pipeline() as pipe:
        try:
            pipe.watch(bound)  # type: ignore[no-untyped-call]  # redis-py leaves Pipeline.watch untyped
            if pipe.get(bound) == job_id.encode():
                pipe.multi()
                pipe.delete(bound)
                pipe.execute()
        except redis.WatchError:
            pass  # rebound meanwhile by another submission: leave it
