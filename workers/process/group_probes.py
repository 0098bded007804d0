"""The HTTP probes of a worker group, served by its launcher from the group's status board.

``/livez`` and ``/readyz`` (workers/process/probes.py serves them) judge the whole group:

* **device** is live while its main loop turns (it ticks the board at least every 0.5 s) and no
  batch of a batched model has been computing for longer than ``FLEET_DEVICE_STALL_S`` (a stuck
  forward pass). Generation and training jobs hold their slot for their whole run and are not
  judged by that clock.
* **consumer** is live while every consuming consumer's Celery event loop has ticked within
  ``FLEET_CONSUMER_STALL_S``. A consumer that is (re)connecting to Redis is *waiting*, not judged:
  a Redis outage makes the group unready, never unlive.
* **ready**: the models are loaded (device ready), every consumer consumes, and Redis answers a
  PING within a second.

``/metrics`` (with Prometheus export on) gathers each process's own metrics from the local port
it published on the board, and adds a ``fleet_process`` label (``device``, ``consumer-0``, ...)
so that the series of different processes stay apart.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from workers.process.status_board import State, StatusBoard

log = logging.getLogger(__name__)

#: How long the launcher waits for one process's metrics (s).
METRICS_FETCH_TIMEOUT_S = 2.0
#: The label that tells the processes of a group apart in ``/metrics``.
PROCESS_LABEL = "fleet_process"


class GroupLiveness:
    """``check()`` like ``probes.Liveness``: parts ``device`` and ``consumer``, each working/silent/stall."""

    def __init__(self, board: StatusBoard, device_stall_s: float, consumer_stall_s: float,
                 judged_slots: Callable[[], Iterable[int]], clock: Callable[[], float] = time.monotonic):
        self._board = board
        self._device_stall_s = device_stall_s
        self._consumer_stall_s = consumer_stall_s
        self._judged_slots = judged_slots
        self._clock = clock

    def check(self) -> tuple[bool, dict[str, Any]]:
        now = self._clock()
        device = self._board.device()
        judged = set(self._judged_slots())
        batches = [entry.started for entry in device.computing if entry.slot in judged]
        loop_silent = now - device.tick if device.tick else 0.0
        if batches:
            device_part = {"working": True, "silent_s": round(max(loop_silent, now - min(batches)), 3)}
        else:
            device_part = {"working": device.state is State.READY, "silent_s": round(loop_silent, 3)}
        device_part["stall_s"] = self._device_stall_s
        consuming = [c for c in self._board.all_consumers() if c.state is State.READY]
        consumer_part = {"working": bool(consuming),
                         "silent_s": round(max((now - c.tick for c in consuming), default=0.0), 3),
                         "stall_s": self._consumer_stall_s}
        parts = {"device": device_part, "consumer": consumer_part}
        live = all(not part["working"] or part["silent_s"] <= part["stall_s"] for part in parts.values())
        return live, parts


class GroupReadiness:
    """``check()`` like ``probes.Readiness``: ``models_loaded``, ``consuming`` and ``redis``."""

    def __init__(self, board: StatusBoard, redis_ping: Callable[[], Any]):
        self._board = board
        self._redis_ping = redis_ping

    def check(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {
            "models_loaded": self._board.device().state is State.READY,
            "consuming": all(c.state is State.READY for c in self._board.all_consumers()),
        }
        try:
            details["redis"] = bool(self._redis_ping())
        except Exception as exc:  # noqa: BLE001 - an unreachable Redis is an answer, not a crash
            details["redis"] = f"{type(exc).__name__}: {exc}"
        return all(value is True for value in details.values()), details


def process_ports(board: StatusBoard) -> dict[str, int]:
    """``fleet_process`` label -> local metrics port, for the processes that published one."""
    ports = {}
    device = board.device()
    if device.metrics_port:
        ports["device"] = device.metrics_port
    for consumer in board.all_consumers():
        if consumer.metrics_port:
            ports[f"consumer-{consumer.index}"] = consumer.metrics_port
    return ports


def gather_metrics(board: StatusBoard) -> bytes:
    """Every process's Prometheus text, with a ``fleet_process`` label on each sample, as one document."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[tuple[str, str], Metric] = {}
    for process, port in process_ports(board).items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=METRICS_FETCH_TIMEOUT_S) as answer:
                text = answer.read().decode()
        except OSError as exc:
            log.warning("metrics of %s (port %d) unavailable: %s", process, port, exc)
            continue
        for family in text_string_to_metric_families(text):
            merged = families.get((family.name, family.type))
            if merged is None:
                merged = families[(family.name, family.type)] = Metric(family.name, family.documentation,
                                                                       family.type, family.unit)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, PROCESS_LABEL: process}))

    class Gathered:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Gathered())
    return generate_latest(registry)


def start_process_metrics_server() -> int | None:
    """In a child process with Prometheus export on: serve its own metrics on a free local port; return it."""
    from producer import telemetry as base

    if not base.prometheus_export_on():
        return None
    from prometheus_client import start_http_server

    server, _ = start_http_server(0, addr="127.0.0.1")
    return int(server.server_port)
