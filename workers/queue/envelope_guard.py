"""A queue item that is not a kombu message ends no worker: it is dead-lettered and skipped.

Below Celery, kombu's Redis transport pops each item of a queue list (``BRPOP``) and parses it as
its message envelope (JSON with ``body``, ``headers``, ``properties`` ...) before any consumer
code runs. An item pushed by something other than a kombu producer (``LPUSH fleet.embed.minilm
hello``) raises there, inside the worker's event loop: Celery treats that as fatal, and the worker
exits with every job it was running (their messages come back only after the visibility timeout).
The item itself is already off the list, so it is lost either way.

``install()`` wraps ``kombu.transport.redis.Channel._brpop_read`` (Sentinel channels inherit it): an
error there that is not a broker connection error (those keep kombu's reconnect path; see
``wire_guard.is_connection_error``) means the popped item could not become a message. (An item that
is a JSON object without ``properties`` raised a ``KeyError``, which kombu counts as a connection
error: the consumer reconnected, and the item was lost without a trace.) It is logged and written to
the dead-letter list under a generated ``invalid-<uuid>`` id with reason ``invalid_message`` and the
start of the item, and the worker goes on consuming. No job can be answered: an item that is not an
envelope names none. The wrapper refuses to install on a kombu or Celery outside the tested range.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid

from workers.queue.dlq import dead_letter
from workers.queue.wire_check import excerpt
from workers.queue.wire_guard import UNNAMED_PREFIX, is_connection_error, require_tested_versions

log = logging.getLogger(__name__)

_INSTALLED_FLAG = "_fleet_envelope_guard"


def install() -> None:
    """Wrap ``Channel._brpop_read`` (idempotent); raise ``UntestedVersionError`` on an untested kombu or Celery."""
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import Empty

    channel_cls = kombu_redis.Channel
    if getattr(channel_cls, _INSTALLED_FLAG, False):
        return
    require_tested_versions()
    original = channel_cls._brpop_read

    def _brpop_read(self, **options):
        try:
            return original(self, **options)
        except Empty:
            raise
        except Exception as exc:
            if is_connection_error(exc, self.connection_errors):
                raise
            _refuse_item(self, exc)
            return True

    functools.update_wrapper(_brpop_read, original, assigned=("__doc__",), updated=())  # __doc__, __wrapped__
    setattr(channel_cls, "_brpop_read", _brpop_read)  # noqa: B010 - patching a method (mypy refuses the assignment)
    setattr(channel_cls, _INSTALLED_FLAG, True)


def _refuse_item(channel, exc: Exception) -> None:
    """Dead-letter a popped queue item that kombu could not turn into a message (``exc`` says why)."""
    item = exc.doc if isinstance(exc, json.JSONDecodeError) else None  # the unparsable item itself
    entry_id = f"{UNNAMED_PREFIX}{uuid.uuid4()}"
    problem = f"the queue item is not a kombu message envelope: {type(exc).__name__}: {excerpt(str(exc))}"
    with channel.conn_or_acquire() as client:
        dead_letter(client, entry_id, task="", queue="", payload=None, reason=f"invalid_message: {problem}",
                    attempts=1, message={"item": excerpt(item) if item is not None else None})
    log.error("refused queue item %s: %s", entry_id, problem)
