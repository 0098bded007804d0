"""Queue depth as kombu's Redis transport stores it: one list per priority step."""

from __future__ import annotations

import redis

from producer.celery_config import PRIORITY_STEPS

#: kombu's separator between a queue name and its priority step (``kombu.transport.redis``).
PRIORITY_SEPARATOR = "\x06\x16"


def priority_lists(queue: str) -> list[str]:
    """The Redis list names that hold ``queue``'s messages, highest priority first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` over all its priority lists (one round trip)."""
    with client.pipeline(transaction=False) as pipe:
        for name in priority_lists(queue):
            pipe.llen(name)
        return sum(pipe.execute())
