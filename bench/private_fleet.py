"""One ``fleet worker`` on a private redis-server, for benchmarks that measure a single worker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from workers.process.embedded_redis import RedisServer
from workers.process.launch import LaunchedWorker


@contextmanager
def worker_on_private_redis(*args: str, name: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start a redis-server and ``fleet worker --name NAME ARGS`` on it (no model hub, WARNING logs, ``env``
    over that), wait for its ready heartbeat and yield the Redis URL; stop both at the end (the
    worker drains first)."""
    server = RedisServer().start()
    worker = LaunchedWorker(server.url, *args, name=name,
                            env={"HF_HUB_OFFLINE": "1", "FLEET_LOG_LEVEL": "WARNING", **(env or {})})
    try:
        worker.wait_ready()
        yield server.url
    finally:
        worker.stop(timeout_s=120)
        server.stop()
