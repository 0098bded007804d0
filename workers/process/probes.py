"""HTTP probes for a worker process: ``/livez``, ``/readyz`` and, with Prometheus export on, ``/metrics``.

Two questions, kept apart (Kubernetes restarts an unlive pod and stops routing to an unready one):

* **Live** (:class:`Liveness`): every part that is working has made progress recently. Parts are
  named (``consumer``, ``device``...) and report progress with ``tick(part)``; a part that has
  nothing to do (a consumer reconnecting to Redis, a device thread waiting for work) says so with
  ``pause(part)`` and is not judged until it ticks again. A part silent for longer than its
  ``stall_s`` while working makes the process unlive. Nothing here talks to Redis: a Redis outage
  can make a worker unready, never unlive.
* **Ready** (:class:`Readiness`): named checks (callables returning ``True``/``False``), e.g.
  models loaded, consuming, Redis reachable. Ready while all pass; a check that raises fails.

:class:`ProbeServer` serves both over HTTP (stdlib ``http.server``, one daemon thread per request)
on ``FLEET_PROBE_PORT``: 200 when the answer is yes, 503 when no; the body is JSON with each part's
or check's state. ``GET /metrics`` serves ``metrics()`` (Prometheus text format) when given, else 404.

Nothing here imports Celery, torch or redis: the device and consumer processes of any shape can
feed the same component.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

log = logging.getLogger(__name__)

Check = Callable[[], bool]


class ProbeAnswer(Protocol):
    """What ``ProbeServer`` asks of each of its questions (``Liveness``, ``Readiness``, the worker group's own):
    ``check()`` returns ``(yes, details)``, the details a JSON-ready dict."""

    def check(self) -> tuple[bool, dict[str, Any]]: ...


@dataclass
class _Part:
    stall_s: float
    last_tick: float
    working: bool


class Liveness:
    """Progress ticks from named parts; live while no working part has been silent past its ``stall_s``.

    Thread-safe; ``tick`` costs a lock and a clock read. ``clock`` is monotonic seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._parts: dict[str, _Part] = {}
        self._lock = threading.Lock()

    def expect(self, part: str, stall_s: float, *, working: bool = False) -> None:
        """Judge ``part``: while working it must tick at least every ``stall_s`` seconds."""
        if stall_s <= 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        with self._lock:
            self._parts[part] = _Part(stall_s, self._clock(), working)

    def tick(self, part: str) -> None:
        """``part`` made progress now (and is working)."""
        with self._lock:
            state = self._parts[part]
            state.last_tick = self._clock()
            state.working = True

    def pause(self, part: str) -> None:
        """``part`` has nothing to do (idle, or waiting on something outside the process)."""
        with self._lock:
            self._parts[part].working = False

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(live, details)``; details per part: ``working``, ``silent_s`` (since its last tick), ``stall_s``."""
        now = self._clock()
        with self._lock:
            details = {name: {"working": p.working, "silent_s": round(now - p.last_tick, 3), "stall_s": p.stall_s}
                       for name, p in self._parts.items()}
        live = all(not d["working"] or d["silent_s"] <= d["stall_s"] for d in details.values())
        return live, details


class Readiness:
    """Named checks; ready while every one returns True. A check that raises counts as failed."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, details)``; details per check: ``True``, ``False`` or the error's text."""
        details: dict[str, Any] = {}
        for name, check in list(self._checks.items()):
            try:
                details[name] = bool(check())
            except Exception as exc:  # noqa: BLE001 - a failing check is an answer, not a crash
                details[name] = f"{type(exc).__name__}: {exc}"
        return all(value is True for value in details.values()), details


class Flag:
    """A thread-safe boolean, usable as a readiness check (``readiness.add("consuming", flag)``)."""

    def __init__(self, value: bool = False):
        self._event = threading.Event()
        self.set(value)

    def set(self, value: bool = True) -> None:
        self._event.set() if value else self._event.clear()

    def __call__(self) -> bool:
        return self._event.is_set()


class ProbeServer:
    """``/livez``, ``/readyz`` and optionally ``/metrics`` on ``host:port`` (port 0: a free one)."""

    def __init__(self, liveness: ProbeAnswer, readiness: ProbeAnswer, port: int, *, host: str = "0.0.0.0",
                 metrics: Callable[[], bytes] | None = None):
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/livez": lambda: _json_answer(*liveness.check()),
            "/readyz": lambda: _json_answer(*readiness.check()),
        }
        if metrics is not None:
            routes["/metrics"] = lambda: (200, "text/plain; version=0.0.4; charset=utf-8", metrics())

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                status, content_type, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.paths = sorted(routes)
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="probes", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> ProbeServer:
        self._thread.start()
        log.info("probes on :%d (%s)", self.port, ", ".join(self.paths))
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _json_answer(ok: bool, details: dict[str, Any]) -> tuple[int, str, bytes]:
    body = json.dumps({"ok": ok, **details}, default=str).encode() + b"\n"
    return (200 if ok else 503), "application/json", body
