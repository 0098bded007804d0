"""Fleet's broker transport: kombu's Redis transport with fewer Redis commands per message.

Installed by ``workers/queue/app.py`` (``install()``) as the transport kombu picks for the
``redis``, ``rediss`` and ``sentinel`` URL schemes in a worker process (kombu's documented alias
table, ``kombu.transport.TRANSPORT_ALIASES``), so the broker URL and every log line keep the
standard scheme. Messages, queues, priorities and the at-least-once bookkeeping
(``unacked`` hash and ``unacked_index`` sorted set, restored after the visibility timeout)
are kombu's own; only how the bookkeeping is written changes:

* **Delivery record without MULTI/EXEC.** kombu records each delivered message with ZADD +
  HSET inside MULTI/EXEC (four commands). Sent as one non-transactional pipeline they are two:
  Redis runs both in order, and the pipeline is one write, so the record is as complete as
  before (``restore_visible`` already skips an index entry without its hash entry).
* **Acknowledgements grouped.** An ack is ZREM + HDEL (plus MULTI/EXEC). Acks that many task
  threads send at once (a device batch finishing) go as one ZREM and one HDEL carrying every
  delivery tag, in one round trip (workers/queue/group_commit.py).

A channel whose connection was lost (``transport.client`` detached) falls back to kombu's
own code paths, which workers/queue/redis_patches.py makes safe across a reconnect. The
subclasses override private methods of kombu's QoS, so ``install`` refuses a kombu they were not
written for (``producer.version_guard``).
"""

from __future__ import annotations

from time import time

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from producer.version_guard import require_tested_version
from workers.queue.group_commit import GroupCommit
from workers.queue.redis_patches import remember_broker

#: URL scheme -> the class kombu uses for it in a worker process.
ALIASES = {"redis": "workers.queue.transport:FleetTransport", "rediss": "workers.queue.transport:FleetTransport",
           "sentinel": "workers.queue.transport:FleetSentinelTransport"}


def install() -> None:
    """Make kombu use these transports for ``redis://``, ``rediss://`` and ``sentinel://`` in this process
    (idempotent); raise ``UntestedVersionError`` on a kombu release they were not written for."""
    from kombu import transport

    require_tested_version("kombu", "Fleet's Redis transport (workers/queue/transport.py)")
    transport.TRANSPORT_ALIASES.update(ALIASES)
    for scheme in ALIASES:
        transport._transport_cache.pop(scheme, None)  # resolved on next use, now to Fleet's class


def _attached(channel) -> bool:
    transport = getattr(channel, "connection", None)
    return getattr(transport, "client", None) is not None


class FleetQoS(kombu_redis.QoS):
    """kombu's Redis QoS with the two changes above."""

    @property
    def _acks(self) -> GroupCommit:
        commit = self.__dict__.get("_fleet_acks")
        if commit is None:
            commit = self.__dict__["_fleet_acks"] = GroupCommit(self.channel._create_client)
        return commit

    def append(self, message, delivery_tag):
        if not _attached(self.channel):
            return super().append(message, delivery_tag)
        remember_broker(self)
        delivery = message.delivery_info
        with self.channel.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
                pipe.hset(self.unacked_key, delivery_tag,
                          dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
                pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)
        return None

    def ack(self, delivery_tag):
        if not _attached(self.channel):
            return super().ack(delivery_tag)
        self._acks.execute(merge={("zrem", self.unacked_index_key): [delivery_tag],
                                  ("hdel", self.unacked_key): [delivery_tag]})
        virtual.QoS.ack(self, delivery_tag)
        return None


class FleetChannel(kombu_redis.Channel):
    QoS = FleetQoS


class FleetSentinelChannel(kombu_redis.SentinelChannel):
    QoS = FleetQoS


class FleetTransport(kombu_redis.Transport):
    """For ``redis://`` and ``rediss://`` brokers."""

    Channel = FleetChannel


class FleetSentinelTransport(kombu_redis.SentinelTransport):
    """For ``sentinel://`` brokers."""

    Channel = FleetSentinelChannel
