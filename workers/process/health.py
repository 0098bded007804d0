"""Worker heartbeats in Redis, and the probe that reads them.

A worker writes ``fleet:heartbeat:<name>`` (JSON, TTL a few intervals) from a background
thread; ``fleet health`` exits 0 only if a fresh, ready heartbeat from this host exists.
Each beat also refreshes the worker's models in the catalog (``fleet:catalog``: model ->
``{"kind", "queue", "last_seen"}``), so that clients can tell a model a live worker serves
from one whose workers are gone, and say when it was last served (producer/core/catalog.py).
Nothing here imports torch: the probe must start fast.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from producer import keys
from producer.redis_connection import text

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes ``snapshot()`` every ``interval_s`` seconds until ``stop()``.

    ``catalog``: the worker's models (name -> ``{"kind", "queue"}``), written to ``fleet:catalog``
    with ``last_seen`` on every beat.
    """

    def __init__(self, redis_client: redis.Redis, worker_name: str, snapshot: Callable[[], dict[str, Any]],
                 interval_s: float, ttl_s: float, catalog: Mapping[str, dict[str, Any]] | None = None):
        self._redis = redis_client
        self.worker_name = worker_name
        self._snapshot = snapshot
        self._catalog = dict(catalog or {})
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self.ready = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def set_catalog(self, catalog: Mapping[str, dict[str, Any]]) -> None:
        """From the next beat on, keep these models in the catalog (a model left out stops being refreshed:
        its ``last_seen`` ages, and no live heartbeat lists it)."""
        self._catalog = dict(catalog)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        """Write one heartbeat now. Redis errors are logged, never raised (the worker reconnects)."""
        now = time.time()
        body = {**self._snapshot(), "name": self.worker_name, "ready": self.ready, "at": now}
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.worker_heartbeat(self.worker_name), json.dumps(body), px=self._ttl_ms)
                pipe.sadd(keys.WORKERS, self.worker_name)
                if self._catalog:
                    pipe.hset(keys.CATALOG, mapping={name: json.dumps({**entry, "last_seen": now})
                                                     for name, entry in self._catalog.items()})
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("heartbeat to Redis failed: %s", exc)

    def stop(self) -> None:
        """Stop beating and remove the heartbeat so probes fail at once."""
        self._stopped.set()
        self.ready = False
        try:
            self._redis.delete(keys.worker_heartbeat(self.worker_name))
            self._redis.srem(keys.WORKERS, self.worker_name)
        except redis.RedisError as exc:
            log.warning("could not remove heartbeat: %s", exc)

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self.beat()


def read_heartbeats(redis_client: redis.Redis) -> list[dict[str, Any]]:
    """Every live worker's heartbeat (expired ones are pruned from the worker set)."""
    names = sorted(text(name) for name in redis_client.smembers(keys.WORKERS))
    if not names:
        return []
    bodies = redis_client.mget([keys.worker_heartbeat(name) for name in names])
    alive = []
    for name, body in zip(names, bodies):
        if body is None:
            redis_client.srem(keys.WORKERS, name)
        else:
            alive.append(json.loads(body))
    return alive


def probe(redis_client: redis.Redis, *, worker: str | None = None, host: str | None = None,
          live: bool = False) -> tuple[bool, str]:
    """Is a matching worker ready (or, with ``live``, merely alive: ready or draining)?

    Matches ``worker`` by node name (with or without ``@host``), else every worker on ``host``.

    Returns ``(ok, reason)``; ``host`` defaults to ``$HOSTNAME`` / the machine's hostname.
    """
    import socket

    host = host or os.environ.get("HOSTNAME") or socket.gethostname()
    beats = read_heartbeats(redis_client)
    mine = [b for b in beats if (worker in (b["name"], b["name"].split("@")[0]) if worker else b.get("host") == host)]
    if not mine:
        return False, f"no heartbeat from {'worker ' + worker if worker else 'any worker on host ' + host}"
    if live:
        return True, ", ".join(f"{b['name']} alive ({'ready' if b.get('ready') else 'draining'})" for b in mine)
    ready = [b for b in mine if b.get("ready")]
    if not ready:
        return False, f"{len(mine)} worker(s) alive but not ready (loading or draining)"
    return True, ", ".join(f"{b['name']} ready on {b.get('device')} serving {','.join(b.get('models', []))}"
                           for b in ready)
