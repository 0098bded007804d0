"""Producer-side settings, read from the environment (standard names where one exists)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class FleetSettings(BaseSettings):
    """Settings both sides need to speak to the broker and result backend.

    Durations are in seconds.
    """

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", populate_by_name=True)

    redis_url: str = Field(DEFAULT_REDIS_URL, validation_alias=AliasChoices("REDIS_URL", "FLEET_REDIS_URL"))
    #: How long results (and Fleet's job records) stay in Redis.
    result_expires_s: int = Field(24 * 3600, ge=60)
    #: An unacked message returns to its queue after this long. Must exceed the longest job
    #: (docs/RELIABILITY.md); values of a few seconds are for crash and chaos tests only.
    visibility_timeout_s: int = Field(12 * 3600, ge=1)
    #: Backpressure: the client refuses (``QueueFull``) to grow a queue past this depth; 0 = no limit.
    max_queue_depth: int = Field(100_000, ge=0)
    #: How long an idempotency key keeps returning the job first submitted with it.
    idempotency_window_s: int = Field(24 * 3600, ge=1)
    #: How long the client trusts its cached copy of the model catalog and of the live workers.
    catalog_cache_s: float = Field(5.0, ge=0)
    #: Accept jobs for a model that no live worker serves (they wait in its queue until one starts:
    #: scale from zero). Off: such a job is refused with ``ModelUnavailableError``. Per job: ``wait_for_worker``.
    wait_for_worker: bool = False
    #: Backpressure reads a queue's depth at most this often (s) and counts its own submissions in
    #: between; 0 reads it on every submission (producer/core/depth.py).
    depth_refresh_s: float = Field(0.05, ge=0)
    #: Redis connections an ``AsyncFleetClient`` uses at most for commands (its one subscription aside);
    #: any number of concurrent waits share them.
    async_max_connections: int = Field(16, ge=1, le=1024)
    #: Redis Sentinel: the monitored master's name, needed when ``REDIS_URL`` is a ``sentinel://`` URL
    #: (``FLEET_SENTINEL_MASTER``). See producer/redis_connection.py and docs/RELIABILITY.md.
    sentinel_master: str | None = Field(None, min_length=1)


def client_settings(redis_url: str | None, settings: FleetSettings | None) -> FleetSettings:
    """What a client runs with: ``settings``, else the environment's; ``redis_url``, if given, overrides."""
    settings = settings or FleetSettings()
    return settings if redis_url is None else settings.model_copy(update={"redis_url": redis_url})
