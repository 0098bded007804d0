"""The probes of today's ``fleet worker``: which parts tick, which checks decide readiness.

Parts judged for liveness: ``consumer`` (the Celery event loop, ticked by the consumer bootstep in
``workers.queue.consumer_progress``) and ``device`` (ticked as each device batch starts and ends,
paused between batches: a batch running longer than ``FLEET_DEVICE_STALL_S`` makes the worker
unlive). Readiness checks: ``models_loaded``, ``consuming``, ``redis`` (a PING with a one-second
timeout on a connection of its own). With ``FLEET_PROBE_PORT`` unset the checks still run for the
``fleet.worker.ready`` metric, but nothing listens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from producer import redis_connection
from producer import telemetry as base
from workers.process.probes import Flag, Liveness, ProbeServer, Readiness
from workers.settings import WorkerSettings

#: Seconds a Redis PING may take before the worker counts as unready.
REDIS_CHECK_TIMEOUT_S = 1.0


class WorkerProbes:
    """Liveness and readiness of one worker process, and the HTTP server that serves them."""

    def __init__(self, settings: WorkerSettings):
        self.liveness = Liveness()
        self.liveness.expect("consumer", settings.consumer_stall_s)
        self.liveness.expect("device", settings.device_stall_s)
        self.models_loaded = Flag()
        self.consuming = Flag()
        self.readiness = Readiness()
        self.readiness.add("models_loaded", self.models_loaded)
        self.readiness.add("consuming", self.consuming)
        ping_client = redis_connection.redis_client(settings, patient=False, socket_timeout=REDIS_CHECK_TIMEOUT_S,
                                                    socket_connect_timeout=REDIS_CHECK_TIMEOUT_S)
        self.readiness.add("redis", ping_client.ping)
        self.server = None
        if settings.probe_port is not None:
            self.server = ProbeServer(self.liveness, self.readiness, settings.probe_port,
                                      metrics=_prometheus_text if base.prometheus_export_on() else None).start()

    def ready(self) -> bool:
        return self.readiness.check()[0]

    @contextmanager
    def device_work(self, name: str, info: Any) -> Iterator[None]:
        """A batcher hook: the device part ticks as a batch starts and ends, and idles between batches."""
        self.liveness.tick("device")
        try:
            yield
        finally:
            self.liveness.tick("device")
            self.liveness.pause("device")

    def consumer_step(self) -> type:
        """The Celery consumer bootstep that ticks ``consumer`` and sets ``consuming``."""
        from workers.queue.consumer_progress import consumer_progress_step

        return consumer_progress_step(self.liveness, self.consuming.set)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _prometheus_text() -> bytes:
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY)
