"""Worker settings, read from the environment through one typed object."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from producer.settings import FleetSettings

DEFAULT_REGISTRY = Path(__file__).parent / "serving" / "registry.default.toml"


class WorkerSettings(FleetSettings):
    """Everything a worker process reads from ``FLEET_*`` (plus ``REDIS_URL``).

    Durations are in seconds.
    """

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", populate_by_name=True)

    #: Path of the TOML model registry (``FLEET_MODEL_REGISTRY``).
    model_registry: Path = DEFAULT_REGISTRY
    #: Threads that run Celery tasks; with batching, the most jobs one batch can gather.
    concurrency: int = Field(32, ge=1, le=1024)
    #: torch intra-op threads on CPU; 0 means torch's default (all cores).
    torch_threads: int = Field(0, ge=0)
    #: On SIGTERM, how long in-flight jobs may take before the rest is handed back.
    drain_grace_s: float = Field(60.0, ge=0)
    #: Deliveries (crashes and failed runs together) before a job goes to the dead-letter list.
    max_attempts: int = Field(3, ge=1, le=100)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    #: Seconds between delivery sweeps, fleet-wide (workers/queue/delivery_sweeper.py); 0 = off.
    sweep_interval_s: float = Field(60.0, ge=0)
    #: A job is examined by the sweep only once it has waited this long since submission (s).
    sweep_grace_s: float = Field(120.0, gt=0)
    #: A heartbeat older than this many intervals means the worker is gone.
    heartbeat_ttl_intervals: int = Field(5, ge=2)
    #: Port of the HTTP probes /livez, /readyz (and /metrics with Prometheus export); unset: none.
    probe_port: int | None = Field(None, ge=0, le=65535)
    #: The consumer loop must turn at least this often while it consumes, or the worker is unlive.
    consumer_stall_s: float = Field(60.0, gt=0)
    #: One device batch may run this long before the worker is unlive (a stuck device thread).
    device_stall_s: float = Field(300.0, gt=0)
    log_level: str = "INFO"
    #: Store the worker's traceback (file paths included) with every failed job (``FLEET_DEBUG_ERRORS=1``).
    debug_errors: bool = False
    #: Where training writes checkpoints and final models (a shared volume in production).
    artifact_dir: Path = Path("var/artifacts")
    hostname: str = Field(default_factory=lambda: os.environ.get("HOSTNAME") or socket.gethostname())
