"""Before a command works with Redis: is it there? One PING, no retries, answered in under 3 s.

Fleet's own clients retry a lost connection patiently (about 10 to 19 s,
``producer.redis_connection.patient_retry``), which rides out a Redis restart but makes a command
started with Redis down sit silent that long. Commands call ``require_redis()`` first, so that
they fail at once with one line (``workers/commands/failures.py``) instead.
"""

from __future__ import annotations

#: Seconds to connect, and then to read the PING reply: a silent host fails in about this long.
PING_TIMEOUT_S = 1.5


def require_redis() -> None:
    """Raise redis-py's ``ConnectionError``/``TimeoutError`` (``AuthenticationError`` for wrong
    credentials) unless the Redis of ``REDIS_URL`` answers a PING; any answer, even an ACL refusal
    of PING itself, means it is there."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from producer.redis_connection import redis_client
    from producer.settings import FleetSettings

    client = redis_client(FleetSettings(), patient=False, retry=Retry(NoBackoff(), 0),
                          socket_connect_timeout=PING_TIMEOUT_S, socket_timeout=PING_TIMEOUT_S)
    try:
        client.ping()
    except redis.ResponseError:  # e.g. NOPERM: the server answered
        pass
    finally:
        client.close()
