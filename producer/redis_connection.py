"""Plain Redis clients for Fleet's own keys (catalog, job records, heartbeats), Sentinel-aware.

Celery and kombu reach the broker and result backend through ``sentinel://`` URLs by
themselves (``producer/celery_config.py`` passes the master name). Fleet's own reads and
writes use redis-py directly; ``redis.Redis.from_url`` does not know ``sentinel://``, so
every Fleet process builds those clients here instead:

    from producer.redis_connection import redis_client
    client = redis_client(settings)            # was: redis.Redis.from_url(settings.redis_url)

``REDIS_URL`` forms:

- ``redis://[[user]:password@]host:port/db`` and ``rediss://...`` (TLS): a plain client,
  exactly ``redis.Redis.from_url``.
- ``sentinel://[[user]:password@]host:port[/db];sentinel://host:port;...``: one entry per
  Sentinel, the form kombu and Celery parse. The credentials and database of the first
  entry are those of the Redis master (and replicas), not of the Sentinels; the master's
  name comes from ``FLEET_SENTINEL_MASTER``. The client asks the Sentinels for the current
  master on every (re)connect, so after a failover it follows the new master by itself.

This module imports neither torch nor worker code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import kombu.exceptions
import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from producer.errors import FleetConnectionError, RedisCommandError, RedisURLError
from producer.settings import FleetSettings
from producer.urls import SENTINEL_SCHEME, is_sentinel_url, redacted_url
from producer.version_guard import require_tested_version

if TYPE_CHECKING:
    from redis.asyncio import Redis as AsyncRedis

__all__ = [
    "redis_client", "async_redis_client", "wait_client", "patient_retry", "redis_errors", "is_sentinel_url",
    "redacted_url", "parse_sentinel_url", "sentinel_master_name", "RedisURLError", "MasterFollowingConnection",
    "CONNECT_TIMEOUT_S", "WAIT_SOCKET_TIMEOUT_S", "text",
]

DEFAULT_SENTINEL_PORT = 26379


#: Fleet's retry policy for its own Redis commands (job records, catalog, heartbeats): on a
#: connection error or timeout, retry with exponential backoff (0.1 s doubling, at most 2 s,
#: with jitter) up to 12 times: between about 10 and 19 s in all, which rides out a Redis
#: restart or a Sentinel failover, then the error is raised. redis-py's default gives up
#: after a second or two (measured: a failover under load then fails ~2 s of submissions).
#: Refused credentials are never retried: they fail at once (``retryable``).
RETRY_ATTEMPTS = 12
RETRY_BACKOFF_BASE_S = 0.1
RETRY_BACKOFF_CAP_S = 2.0
#: A connect attempt to a silent (black-holed) host fails after this long, so that the
#: retry bound above holds there too.
CONNECT_TIMEOUT_S = 2.0
#: Socket timeout of the connections clients wait on (results, streams): longer than the
#: longest blocking read they issue (``STREAM_BLOCK_SLICE_S``), short enough that a silent Redis
#: cannot hold a wait long past its timeout.
WAIT_SOCKET_TIMEOUT_S = 3.0


def retryable(error: Exception) -> bool:
    """Whether a connection error may go away by itself: not when Redis refused the credentials."""
    return not isinstance(error, (redis.AuthenticationError, redis.exceptions.AuthorizationError))


def patient_retry() -> Retry:
    """The retry policy above, as a redis-py ``Retry`` (a new object per client)."""
    return Retry(EqualJitterBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S), RETRY_ATTEMPTS,
                 is_retryable=retryable)


def wait_client(settings: FleetSettings, **options: Any) -> redis.Redis:
    """The client a producer waits on: one quick retry, ``WAIT_SOCKET_TIMEOUT_S``; its waits retry by themselves.
    ``options`` as for ``redis_client``."""
    return redis_client(settings, patient=False, socket_timeout=WAIT_SOCKET_TIMEOUT_S,
                        socket_connect_timeout=CONNECT_TIMEOUT_S,
                        retry=Retry(EqualJitterBackoff(cap=0.5, base=0.1), 1, is_retryable=retryable), **options)


#: What redis-py and kombu raise when Redis cannot be reached or refuses the credentials.
CONNECTION_FAILURES = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)


@contextlib.contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """Turn a redis-py or kombu failure inside the block into Fleet's errors for ``url``:
    ``FleetConnectionError`` when Redis cannot be reached or refuses the credentials,
    ``RedisCommandError`` when it refuses a command."""
    try:
        yield
    except CONNECTION_FAILURES as exc:
        raise FleetConnectionError(url, exc) from exc
    except kombu.exceptions.BatchPublishError as exc:  # kombu's pipelined publish: the cause says why
        cause = exc.__cause__ or exc
        error = FleetConnectionError if isinstance(cause, CONNECTION_FAILURES) else RedisCommandError
        raise error(url, cause) from exc
    except redis.RedisError as exc:
        raise RedisCommandError(url, exc) from exc


class MasterFollowingConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that asks the Sentinels for the master on *every* reconnect.

    redis-py 8's ``SentinelManagedConnection`` looks the master up in ``connect()``, but a
    command retried after a connection error reconnects through ``connect_check_health()``
    (from ``send_packed_command``), which reuses the address of the master that just died.
    With a patient retry policy a command issued across a failover then spends its whole
    retry budget (~14 s measured) knocking on the dead master and fails. Routing those
    reconnects through ``connect()`` makes it follow the promoted replica within one retry.
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock:
            return
        if not retry_socket_connect:  # called by connect_to() with a freshly looked-up address
            super().connect_check_health(check_health=check_health, retry_socket_connect=False)
            return
        self.connect()  # type: ignore[no-untyped-call]  # redis-py leaves connect() unannotated


@dataclass(frozen=True)
class SentinelURL:
    """The parts of a ``sentinel://a:26379;sentinel://b:26379`` URL."""

    sentinels: list[tuple[str, int]]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Split a ``;``-separated list of ``sentinel://`` URLs into Sentinel addresses and credentials."""
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for index, chunk in enumerate(part.strip() for part in url.split(";")):
        if not chunk:
            continue
        parts = urlsplit(chunk)
        if parts.scheme.lower() != SENTINEL_SCHEME:
            raise RedisURLError(f"entry {index + 1} of a Sentinel URL must start with sentinel://")
        try:
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise RedisURLError(f"entry {index + 1} of the Sentinel URL has an invalid port") from None
        if not parts.hostname:
            raise RedisURLError(f"entry {index + 1} of the Sentinel URL has no host")
        sentinels.append((parts.hostname, port))
        if index == 0:  # kombu and Celery take the master's credentials and db from the first entry
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password else None
            path = parts.path.strip("/")
            if path:
                if not path.isdigit():
                    raise RedisURLError("the database in a Sentinel URL must be a number")
                db = int(path)
    if not sentinels:
        raise RedisURLError("the Sentinel URL names no Sentinel")
    return SentinelURL(sentinels, db, username, password)


def sentinel_master_name(settings: FleetSettings) -> str:
    """The master name for a Sentinel ``REDIS_URL``, or a clear error if it is missing."""
    if not settings.sentinel_master:
        raise RedisURLError("REDIS_URL is a sentinel:// URL: set FLEET_SENTINEL_MASTER to the master's name")
    return settings.sentinel_master


def _sentinel_parts(settings: FleetSettings, options: dict[str, Any]
                    ) -> tuple[SentinelURL, str, dict[str, Any], dict[str, Any]]:
    spec = parse_sentinel_url(settings.redis_url)
    master = sentinel_master_name(settings)
    # Sentinels get only the socket options (no password: the URL's credentials are the master's).
    sentinel_kwargs = {key: value for key, value in options.items() if key.startswith("socket_")}
    master_kwargs = {"db": spec.db, "connection_class": MasterFollowingConnection, **options}
    if spec.username:
        master_kwargs["username"] = spec.username
    if spec.password:
        master_kwargs["password"] = spec.password
    return spec, master, sentinel_kwargs, master_kwargs


def _with_policy(options: dict[str, Any], patient: bool) -> dict[str, Any]:
    if patient:
        options = {"retry": patient_retry(), "socket_connect_timeout": CONNECT_TIMEOUT_S, **options}
    return options


def redis_client(settings: FleetSettings, *, patient: bool = True, **options: Any) -> redis.Redis:
    """A redis-py client for ``settings.redis_url``: plain, TLS, or the Sentinel master.

    ``patient`` (the default) retries connection errors for up to ~19 s (``patient_retry``):
    right for producers and workers. Probes that must answer fast (``fleet health``) pass
    ``patient=False`` and get redis-py's short default. ``options`` are redis-py connection
    keywords (``socket_timeout=2``, ...), applied to the master connections and, for the
    socket ones, to the Sentinel connections too.
    """
    options = _with_policy(options, patient)
    if not is_sentinel_url(settings.redis_url):
        return redis.Redis.from_url(settings.redis_url, **options)
    spec, master, sentinel_kwargs, master_kwargs = _sentinel_parts(settings, options)
    require_tested_version("redis", "producer.redis_connection.MasterFollowingConnection")
    sentinel = Sentinel(spec.sentinels, sentinel_kwargs=sentinel_kwargs)
    client: redis.Redis = sentinel.master_for(master, **master_kwargs)  # redis-py leaves its return type out
    return client


def async_redis_client(settings: FleetSettings, *, patient: bool = True, **options: Any) -> AsyncRedis:
    """The asyncio twin of ``redis_client`` (``redis.asyncio.Redis``), with the same retry policy.

    ``max_connections`` (an option) bounds the connections of its pool, Sentinel or not.
    """
    from redis import asyncio as aioredis
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    if patient:
        options = {"retry": AsyncRetry(EqualJitterBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S),
                                       RETRY_ATTEMPTS, is_retryable=retryable),
                   "socket_connect_timeout": CONNECT_TIMEOUT_S, **options}

    if not is_sentinel_url(settings.redis_url):
        return aioredis.Redis.from_url(settings.redis_url, **options)
    spec, master, sentinel_kwargs, master_kwargs = _sentinel_parts(settings, options)
    if master_kwargs.get("connection_class") is MasterFollowingConnection:
        del master_kwargs["connection_class"]  # sync class; the asyncio client keeps redis-py's own
    sentinel = AsyncSentinel(spec.sentinels, sentinel_kwargs=sentinel_kwargs)
    client: AsyncRedis = sentinel.master_for(master, **master_kwargs)  # redis-py leaves its return type out
    return client


def text(reply: bytes | str) -> str:
    """A Redis reply as text. Fleet's clients return bytes (no ``decode_responses``); redis-py types
    replies ``bytes | str``, so code that decodes one says so through here."""
    return reply.decode() if isinstance(reply, bytes) else reply
