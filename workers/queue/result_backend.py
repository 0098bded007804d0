"""How a worker writes results: strict JSON, and no worker tracebacks unless asked for.

- Strict JSON: results, progress and errors are encoded with ``allow_nan=False``: a NaN or an
  infinity never reaches Redis (``NaN`` is not JSON; JavaScript's ``JSON.parse`` refuses it).
  The serializer is registered with kombu as ``STRICT_JSON`` under the content type
  ``application/json``, so readers decode it as plain JSON. A value that is not finite makes
  storing the result raise kombu's ``EncodeError``; Celery then stores a FAILURE with that error
  instead. (Model outputs are checked before that, see ``workers/serving/finite_outputs.py``:
  such a job fails with ``model_error``.)
- Tracebacks: Celery stores the worker's traceback, file paths included, beside every FAILURE
  and RETRY. ``FleetRedisBackend`` and ``FleetSentinelBackend`` (Celery's Redis result backends,
  picked through the ``result_backend`` setting's ``<class>+<url>`` form) store ``null`` there
  unless the worker runs with ``FLEET_DEBUG_ERRORS=1``.
"""

from __future__ import annotations

from functools import partial

from celery.backends.redis import RedisBackend, SentinelBackend
from kombu.serialization import registry
from kombu.utils import json as kombu_json

from producer.redis_connection import is_sentinel_url

#: kombu serializer name of strict JSON (content type ``application/json``).
STRICT_JSON = "fleet-strict-json"
#: Celery configuration key: True stores worker tracebacks with failures (``FLEET_DEBUG_ERRORS``).
DEBUG_ERRORS_KEY = "fleet_debug_errors"


def register_strict_json() -> None:
    """Register ``STRICT_JSON`` with kombu (idempotent); decoding stays kombu's own JSON decoder."""
    registry.register(STRICT_JSON, partial(kombu_json.dumps, allow_nan=False), None,
                      content_type="application/json", content_encoding="utf-8")


class WithoutTracebacks:
    """Result backend mixin: ``store_result`` keeps the traceback only when ``DEBUG_ERRORS_KEY`` is on."""

    def store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        if not self.app.conf.get(DEBUG_ERRORS_KEY):
            traceback = None
        return super().store_result(task_id, result, state, traceback, request, **kwargs)


class FleetRedisBackend(WithoutTracebacks, RedisBackend):
    """Celery's Redis result backend (``redis://``, ``rediss://``) without worker tracebacks."""


class FleetSentinelBackend(WithoutTracebacks, SentinelBackend):
    """Celery's Sentinel result backend (``sentinel://``) without worker tracebacks."""


def result_backend_setting(redis_url: str) -> str:
    """The ``result_backend`` value that selects Fleet's backend class for ``redis_url``."""
    backend = FleetSentinelBackend if is_sentinel_url(redis_url) else FleetRedisBackend
    return f"{backend.__module__}:{backend.__qualname__}+{redis_url}"
