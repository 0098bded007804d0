"""Fixes that keep a busy worker correct across a Redis restart or failover.

Found by ``tests/integration/test_redis_restart.py`` and ``python -m bench.chaos`` with kombu 5.7.0,
Celery 5.7 and redis-py 8. ``install()`` applies all of them (idempotent); ``workers/queue/app.py``
calls it, so every worker process (and Flower) has them.

A. kombu: the worker dies when Redis drops while jobs are in flight (same code path as
   celery/kombu#582 and #970). Celery's consumer runs ``connection.collect()`` and then
   ``connection.close()``. ``collect()`` detaches the transport (``transport.client =
   None``) even when closing the task channel failed on the dead socket (a pending BRPOP
   read). ``close()`` then closes that channel again, which hands the in-flight messages
   back (``QoS.restore_unacked``) through a pool built from ``transport.client``:
   ``AttributeError: 'NoneType' object has no attribute 'hostname'``. Not a connection
   error, so Celery calls it unrecoverable and the process exits with its jobs running.
   An idle worker has nothing to restore, which is why the bug hides from tests that
   restart Redis between jobs.

B. kombu: jobs that were running when the connection dropped acknowledge their message on
   the old, closed channel after the reconnect; the ack fails, the message stays in
   Redis' ``unacked`` hash and the job runs a second time once the visibility timeout has
   passed (12 h later by default): wasted work (Celery ignores the second store after a
   SUCCESS), and one more delivery counted toward the dead-letter limit.

C. Celery: a finished job whose result is stored while Redis is still loading its
   append-only file after a restart (``BusyLoadingError``, a ``ConnectionError``) or is
   briefly unreachable, ends in FAILURE with that error although the job succeeded: the
   result backend's redis-py client has no retry policy for commands, and
   ``Backend.store_result`` first reads the current state with an unretried GET. The chaos
   run found 11 of 5,000 jobs failed this way around a Redis restart. The same client
   serves every Redis call a task makes (attempt counter, cancel flag, streamed pieces).

D. redis-py 8 (Sentinel): a command retried after a connection error reconnects to the
   address of the master that just died instead of asking the Sentinels again, so with a
   retry policy it spends its whole budget on the dead master. kombu's Sentinel channels
   and Celery's Sentinel result backend get ``MasterFollowingConnection``
   (``producer/redis_connection.py``), which looks the master up on every reconnect.

The fixes:

- A: ``restore_unacked`` on a detached channel restores nothing. Handing the in-flight
  messages back would be wrong there anyway: their jobs are still running in this process
  and will acknowledge them; and every delivered message is recorded in Redis' ``unacked``
  hash (kombu writes it at delivery), from which ``restore_visible`` returns it to its
  queue after the visibility timeout if this process dies before acknowledging it.
- B: ``ack``/``reject`` on a detached channel go through a fresh connection cloned from the
  one the message came on (same URL and transport options, Sentinel included).
- C: the result backend's client retries connection errors and timeouts (Redis loading its
  data included) with the backoff of ``producer.redis_connection.patient_retry`` (about
  10 to 19 s in all) before an error reaches the task; ``workers/queue/app.py`` also sets
  ``result_backend_always_retry`` so that storing a result outlasts longer outages.

A graceful shutdown, the drain hand-back in ``workers/process/worker_main.py`` and every ack on a
live channel take kombu's own code paths unchanged.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_INSTALLED_FLAG = "_fleet_patched"


def _broker_of(channel):
    """The ``kombu.Connection`` a live channel belongs to, else None."""
    transport = getattr(channel, "connection", None)
    return getattr(transport, "client", None)


def install() -> None:
    """Apply fixes A to D (once per process); refuse on a celery, kombu or redis-py release they were not written for."""
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

    _create_client.__doc__ = original.__doc__
    _create_client.__wrapped__ = original
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
        if self.__dict__.get("_fleet_broker") is None:
            self._fleet_broker = _broker_of(self.channel)  # remembered for acks after a reconnect
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
        function.__doc__ = original.__doc__
        function.__wrapped__ = original
        setattr(qos_cls, name, function)
    setattr(qos_cls, _INSTALLED_FLAG, True)
