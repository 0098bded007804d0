"""Fixes to kombu's and Celery's Redis handling that keep a busy worker correct across a Redis
restart or failover.

``install()`` applies them once per process (``workers/queue/app.py`` calls it, so every worker
and Flower has them) and refuses, with ``UntestedVersionError``, on a celery, kombu or redis-py
release outside ``producer.version_guard.TESTED_VERSIONS``. Why each fix is needed and the runs
that showed it: docs/RELIABILITY.md, "Redis restarts" (A to C) and "Sentinel" (D).

What each one guarantees:

- A. A worker whose broker connection drops while it holds unacknowledged messages keeps
  running: ``QoS.restore_unacked`` on a detached channel restores nothing. The jobs are still
  running in this process and will acknowledge their messages; every delivered message stays
  recorded in Redis' ``unacked`` hash, from which ``restore_visible`` returns it to its queue
  after the visibility timeout if this process dies first.
- B. A job that finishes after a reconnect is acknowledged (or rejected) once, not run again:
  ``ack``/``reject`` on a detached channel go through a fresh connection cloned from the one
  the message came on (same URL and transport options, Sentinel included).
- C. A finished job's result is stored as what it is while Redis loads its data after a restart
  (``BusyLoadingError``) or is briefly unreachable: the result backend's redis-py client, which
  also serves every Redis call a task makes, retries connection errors and timeouts with
  ``producer.redis_connection.patient_retry`` (about 10 to 19 s); ``workers/queue/app.py`` also
  sets ``result_backend_always_retry`` so that storing a result outlasts longer outages.
- D. Sentinel: kombu's Sentinel channels and Celery's Sentinel result backend use
  ``MasterFollowingConnection`` (``producer/redis_connection.py``), which asks the Sentinels for
  the master on every reconnect.

A graceful shutdown, the drain hand-back in ``workers/process/worker_main.py`` and every ack on a
live channel take kombu's own code paths unchanged.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

_INSTALLED_FLAG = "_fleet_patched"


def _broker_of(channel):
    """The ``kombu.Connection`` a live channel belongs to, else None."""
    transport = getattr(channel, "connection", None)
    return getattr(transport, "client", None)


def remember_broker(qos) -> None:
    """Keep the ``kombu.Connection`` a QoS's messages came on, for acks after a reconnect (fix B)."""
    if qos.__dict__.get("_fleet_broker") is None:
        qos._fleet_broker = _broker_of(qos.channel)


def install() -> None:
    """Apply fixes A to D (once per process); refuse on a celery, kombu or redis-py release outside
    ``producer.version_guard.TESTED_VERSIONS``."""
    from producer.version_guard import require_tested_version

    for distribution in ("celery", "kombu", "redis"):
        require_tested_version(distribution, "workers.queue.redis_patches")
    _patch_kombu_qos()
    _patch_result_backend_client()


def _patch_result_backend_client() -> None:
    """C: give the Celery Redis result backend's client a retry policy for its commands."""
    import redis as redis_py
    from celery.backends import redis as celery_redis

    from producer.redis_connection import MasterFollowingConnection, patient_retry

    backend_cls = celery_redis.RedisBackend  # SentinelBackend inherits it
    if getattr(backend_cls, _INSTALLED_FLAG, False):
        return
    original = backend_cls._create_client

    def _create_client(self, **params):
        params.setdefault("retry", patient_retry())
        params.setdefault("retry_on_error", [redis_py.exceptions.ConnectionError, redis_py.exceptions.TimeoutError])
        if isinstance(self, celery_redis.SentinelBackend) and "connection_class" not in params:
            params["connection_class"] = MasterFollowingConnection  # follows a failover on retry
        return original(self, **params)

    functools.update_wrapper(_create_client, original, assigned=("__doc__",), updated=())  # __doc__, __wrapped__
    backend_cls._create_client = _create_client
    setattr(backend_cls, _INSTALLED_FLAG, True)


def _patch_kombu_qos() -> None:
    """A and B: patch ``kombu.transport.redis.QoS``; Sentinel channels follow a failover on retry."""
    from kombu.transport import redis as kombu_redis

    from producer.redis_connection import MasterFollowingConnection

    if kombu_redis.SentinelChannel.connection_class is kombu_redis.sentinel.SentinelManagedConnection:
        kombu_redis.SentinelChannel.connection_class = MasterFollowingConnection
    from kombu.transport import virtual

    qos_cls = kombu_redis.QoS
    if getattr(qos_cls, _INSTALLED_FLAG, False):
        return
    original_append = qos_cls.append
    original_restore_unacked = qos_cls.restore_unacked
    original_ack = qos_cls.ack
    original_reject = qos_cls.reject

    def append(self, message, delivery_tag):
        remember_broker(self)
        return original_append(self, message, delivery_tag)

    def restore_unacked(self, client=None):
        if client is None and _broker_of(self.channel) is None:
            held = len(self._delivered)
            self._delivered.clear()
            if held:
                log.warning("broker connection lost with %d message(s) in flight: they stay in Redis (unacked) "
                            "until their jobs finish and acknowledge them, or return to their queues after the "
                            "visibility timeout if this worker dies first", held)
            return None
        return original_restore_unacked(self, client)

    def _with_fresh_client(self, action) -> None:
        broker = self.__dict__.get("_fleet_broker")
        if broker is None:
            raise RuntimeError("message channel is closed and its broker is unknown")
        with broker.clone() as fresh:
            action(fresh.default_channel.client)

    def ack(self, delivery_tag):
        if _broker_of(self.channel) is not None:
            return original_ack(self, delivery_tag)
        _with_fresh_client(self, lambda client: self._remove_from_indices(delivery_tag, client.pipeline()).execute())
        virtual.QoS.ack(self, delivery_tag)
        log.info("acknowledged message %s from before a broker reconnect", delivery_tag)
        return None

    def reject(self, delivery_tag, requeue=False):
        if _broker_of(self.channel) is not None:
            return original_reject(self, delivery_tag, requeue=requeue)
        if requeue:
            _with_fresh_client(self, lambda client: self.restore_by_tag(delivery_tag, client=client, leftmost=True))
        else:
            _with_fresh_client(self, lambda client: self._remove_from_indices(delivery_tag, client.pipeline())
                               .execute())
        virtual.QoS.ack(self, delivery_tag)
        return None

    for name, function, original in (("append", append, original_append),
                                     ("restore_unacked", restore_unacked, original_restore_unacked),
                                     ("ack", ack, original_ack), ("reject", reject, original_reject)):
        functools.update_wrapper(function, original, assigned=("__doc__",), updated=())  # __doc__, __wrapped__
        setattr(qos_cls, name, function)
    setattr(qos_cls, _INSTALLED_FLAG, True)
