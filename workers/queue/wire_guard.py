"""No message ends a worker, and every message it cannot run is answered.

Celery's consumer reads a task message's headers and body before any task code runs, and it
trusts them: a body that is a JSON object, ``null`` or a number, a ``[[request]]``, an empty
body, a content type of ``""``, a ``task`` header that is a list, or no ``id`` raise inside
the consumer, which Celery treats as fatal: the worker process exits and the unacknowledged
message comes back to end the next one. Messages it can tell are bad (not JSON, a refused
serializer, bad compression) it drops with a log line: no result, so the sender waits forever.

``GuardedConsumer`` is Celery's consumer with two changes, installed through Celery's
``worker_consumer`` setting (``workers/queue/app.py``):

- every task message is first read by ``workers.queue.wire_check.read_task_message``; one
  that Fleet cannot run, and any message Celery's own handler or kombu's decoding fails on,
  is *refused*: its job (when the message names one) ends in FAILURE with ``invalid_message``
  and what was wrong, the message goes to the dead-letter list (keyed by its job id, or by a
  generated ``invalid-<uuid>`` when it has none), and only then is it acknowledged. If Redis
  fails on the way, the message stays unacknowledged and is refused again on redelivery;
- a broker connection error still propagates, so that Celery reconnects as it always does
  (``is_connection_error``).

It relies on how Celery 5.7 builds its task handler (``Consumer.create_task_handler``) and
calls ``on_decode_error``, so it refuses to start on a Celery or kombu outside the tested
range (``producer.version_guard.TESTED_VERSIONS``).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from celery import states
from celery.worker.consumer.consumer import Consumer

from producer.contract import TASK_FOR_KIND, TASK_TRAIN, ErrorCode
from producer.errors import JobFailedError
from producer.version_guard import require_tested_version
from workers.queue.dlq import dead_letter
from workers.queue.wire_check import TaskMessage, excerpt, read_headers, read_task_message

log = logging.getLogger(__name__)

#: The tasks a Fleet worker runs; a message naming any other task is refused.
FLEET_TASKS = frozenset({*TASK_FOR_KIND.values(), TASK_TRAIN})
#: Dead-letter key prefix for a refused message that names no job.
UNNAMED_PREFIX = "invalid-"


def require_tested_versions() -> None:
    """Refuse (``UntestedVersionError``) to guard a Celery or kombu this guard was not written for."""
    for distribution in ("celery", "kombu"):
        require_tested_version(distribution, "Fleet's message guard (workers/queue/wire_guard.py)")


def is_connection_error(exc: Exception, connection_errors: tuple) -> bool:
    """True if ``exc`` is a broker connection error, on which Celery reconnects and the message stays unacked.

    kombu counts ``KeyError`` among the Redis transport's connection errors (for a stale socket after a
    broker restart), but a ``KeyError`` raised while a message is read comes from the message: counted as a
    connection error, the consumer would reconnect and read the same message again, without end.
    """
    return isinstance(exc, connection_errors) and not isinstance(exc, KeyError)


class GuardedConsumer(Consumer):
    """Celery's worker consumer that refuses, and answers, every message it cannot run (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_tested_versions()
        super().__init__(*args, **kwargs)

    def create_task_handler(self, *args: Any, **kwargs: Any):
        """Celery's task handler behind ``read_task_message``, with any failure of it turned into a refusal."""
        celery_handler = super().create_task_handler(*args, **kwargs)
        known_tasks = FLEET_TASKS & set(self.app.tasks)

        def on_task_received(message) -> None:
            read = read_task_message(message, known_tasks)
            if read.problem is not None:
                return self.refuse(message, read)
            try:
                return celery_handler(message)
            except Exception as exc:
                if is_connection_error(exc, self.connection_errors):
                    raise
                log.exception("Celery could not take message of job %s", read.job_id)
                return self.refuse(message, read.refuse(f"the worker could not take this message: "
                                                        f"{type(exc).__name__}: {excerpt(str(exc))}"))

        return on_task_received

    def on_decode_error(self, message, exc: Exception) -> None:
        """kombu could not decode ``message`` (for example a bad ``compression`` header): refuse it."""
        self.refuse(message, read_headers(message).refuse(f"the message cannot be decoded: {type(exc).__name__}: "
                                         f"{excerpt(str(exc))}"))

    def refuse(self, message, read: TaskMessage) -> None:
        """Dead-letter the message, answer ``read.job_id`` with FAILURE ``invalid_message``, then acknowledge it.

        ``read`` is a refused reading: its ``problem`` is set (``TaskMessage.refuse``)."""
        assert read.problem is not None, "refuse() takes a refused TaskMessage"
        backend = self.app.backend
        entry_id = read.job_id or f"{UNNAMED_PREFIX}{uuid.uuid4()}"
        dead_letter(backend.client, entry_id, task=read.task or "", queue=_routing_key(message),
                    payload=_json_safe(read.request_object()), reason=f"invalid_message: {read.problem}", attempts=1,
                    message=_message_summary(message))
        if read.job_id is not None:  # after the dead letter: whoever sees the answer finds the entry too
            details = {"problem": read.problem, **read.details}
            backend.store_result(read.job_id, JobFailedError(ErrorCode.INVALID_MESSAGE.value, read.problem, details),
                                 states.FAILURE)
        log.error("refused message %s (task %s): %s", entry_id, read.task, read.problem)
        if not message.acknowledged:
            message.ack_log_error(log, self.connection_errors)


def _routing_key(message) -> str:
    delivery_info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    routing_key = delivery_info.get("routing_key")
    return routing_key if isinstance(routing_key, str) else ""


def _json_safe(value: Any) -> Any:
    """``value`` if it encodes as strict JSON (it came from a decoded body, so it nearly always does), else None."""
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, RecursionError):
        return None
    return value


def _message_summary(message) -> dict[str, Any]:
    """What the dead-letter entry keeps of a refused message: its framing and the start of its body."""
    body = message.body if isinstance(message.body, (bytes, bytearray, str)) else b""
    return {"content_type": excerpt(message.content_type), "content_encoding": excerpt(message.content_encoding),
            "headers": excerpt(message.headers), "body": excerpt(body), "body_length": len(body)}
