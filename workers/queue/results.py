"""Fleet's result backend: Celery's Redis backend with fewer round trips per job.

Configured by ``workers/queue/app.py`` as ``result_backend = "<this class>+redis://..."``
(Celery's documented ``<backend class>+<url>`` form), so every result keeps Celery's key
(``celery-task-meta-<id>``), value format and expiry, and any Celery client reads it. What
changes, and why:

* **No GET before a write on a first delivery.** Celery reads a job's stored state before
  every write so that a lost, redelivered job cannot overwrite a SUCCESS. A first delivery
  (not redelivered, not a retry) has no earlier result to protect, so the read is skipped;
  redeliveries and retries still read.
* **Only final states are published.** ``SUCCESS``, ``FAILURE`` and ``REVOKED`` wake the
  waiters that subscribe to the key's channel; intermediate states (``RETRY``, ``PROGRESS``)
  are stored, not published (Fleet's clients read them with GET; ``STARTED`` is written by the
  job's start round trip, workers/queue/job_context.py).
* **Group commit.** Results stored by many task threads at once (a device batch finishing)
  share one pipeline round trip (workers/queue/group_commit.py), non-transactional: SETEX and
  PUBLISH per job, no MULTI/EXEC.
* **Per-job result lifetime.** A job's ``fleet_result_ttl_s`` header (docs/PROTOCOL.md), when
  valid, replaces ``result_expires`` for that job's result.
* **No worker tracebacks.** Celery stores the worker's traceback, file paths included, beside
  every FAILURE and RETRY; here it is ``null`` unless the worker runs with ``FLEET_DEBUG_ERRORS=1``.

It overrides Celery's private ``_store_result``, so ``check_versions`` refuses a Celery it was not
written for (``producer.version_guard``); workers/queue/app.py calls it.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from producer.redis_connection import is_sentinel_url
from producer.version_guard import require_tested_version
from workers.queue.group_commit import GroupCommit

#: Celery configuration key: True stores worker tracebacks with failures (``FLEET_DEBUG_ERRORS``).
DEBUG_ERRORS_KEY = "fleet_debug_errors"
#: Message header with a job's own result lifetime in seconds (1 .. 30 days).
RESULT_TTL_HEADER = "fleet_result_ttl_s"
MAX_RESULT_TTL_S = 30 * 24 * 3600


def check_versions() -> None:
    """Raise ``UntestedVersionError`` on a Celery release this backend was not written for."""
    require_tested_version("celery", "Fleet's result backend (workers/queue/results.py)")


def first_delivery(request: Any) -> bool:
    """True if ``request`` is a job's first delivery: not redelivered by the broker, not a retry."""
    if request is None:
        return False
    delivery_info = getattr(request, "delivery_info", None) or {}
    return not delivery_info.get("redelivered") and not getattr(request, "retries", 0)


def result_ttl(request: Any, default: int | None) -> int | None:
    """The job's ``fleet_result_ttl_s`` if it is a whole number of seconds in range, else ``default``."""
    value = getattr(request, RESULT_TTL_HEADER, None) if request is not None else None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_RESULT_TTL_S:
        return value
    return default


class FleetResultsMixin:
    """The changes above, over Celery's ``RedisBackend`` (and its Sentinel subclass)."""

    # What this mixin uses of the RedisBackend it is mixed into.
    client: redis.Redis
    _MAX_STR_VALUE_SIZE: int

    @property
    def group_commit(self) -> GroupCommit:
        commit = self.__dict__.get("_fleet_group_commit")
        if commit is None:
            commit = self.__dict__["_fleet_group_commit"] = GroupCommit(lambda: self.client)
        return commit

    def store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        if not self.app.conf.get(DEBUG_ERRORS_KEY):
            traceback = None
        return super().store_result(task_id, result, state, traceback, request, **kwargs)

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        if not first_delivery(request) and self._get_task_meta_for(task_id)["status"] == states.SUCCESS:
            return result
        expires = self.failure_expires if state == states.FAILURE else self.expires
        self.write(self.get_key_for_task(task_id), self.encode(meta), state, result_ttl(request, expires))
        return result

    def write(self, key: str, value: Any, state: str, expires: int | None) -> None:
        """Store ``value`` under ``key`` (publishing it if ``state`` is final), grouped with other threads."""
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")

        def queue(pipe) -> None:
            if expires:
                pipe.setex(key, expires, value)
            else:
                pipe.set(key, value)
            if state in states.READY_STATES:
                pipe.publish(key, value)

        for reply in self.group_commit.execute(queue):
            if isinstance(reply, Exception):
                raise reply


class FleetRedisBackend(FleetResultsMixin, RedisBackend):
    """For ``redis://`` and ``rediss://`` result backends."""


class FleetSentinelBackend(FleetResultsMixin, SentinelBackend):
    """For ``sentinel://`` result backends."""


def result_backend_setting(redis_url: str) -> str:
    """The ``result_backend`` value that selects Fleet's backend class for ``redis_url``
    (Celery's ``<backend class>+<url>`` form)."""
    backend = FleetSentinelBackend if is_sentinel_url(redis_url) else FleetRedisBackend
    return f"{backend.__module__}:{backend.__qualname__}+{redis_url}"
