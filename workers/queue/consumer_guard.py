"""A message whose ``task`` header is not a string is refused, instead of killing the worker.

Celery's consumer looks the task up by that header (``strategies[message.headers["task"]]``)
before any Fleet code runs; a list or a dict there raises ``TypeError: unhashable type``,
which Celery treats as fatal: the worker process exits, and the message, still unacked,
comes back to kill the next worker. ``install()`` wraps the consumer's task handler so that
such a message is rejected (dropped, as Celery drops a message of unknown format) and, when
its ``id`` header is a string, its job ends in FAILURE with ``invalid_input``.
``workers/queue/app.py`` calls it, so every worker process has it.
"""

from __future__ import annotations

import logging

from celery import states
from celery.worker.consumer.consumer import Consumer

from producer.contract import ErrorCode
from producer.errors import JobFailedError
from producer.version_guard import require_tested_version

log = logging.getLogger(__name__)


def bad_task_header(message) -> bool:
    """True if ``message`` names its task with something other than a string (protocol 2 headers)."""
    headers = getattr(message, "headers", None)
    return isinstance(headers, dict) and "task" in headers and not isinstance(headers["task"], str)


def install() -> None:
    """Guard ``Consumer.create_task_handler`` (idempotent); refuse on a Celery release it was not written for."""
    require_tested_version("celery", "workers.queue.consumer_guard")
    if getattr(Consumer.create_task_handler, "fleet_guarded", False):
        return
    original = Consumer.create_task_handler

    def create_task_handler(self, *args, **kwargs):
        handler = original(self, *args, **kwargs)

        def on_task_received(message):
            if bad_task_header(message):
                return _refuse(self, message)
            return handler(message)

        return on_task_received

    create_task_handler.fleet_guarded = True  # type: ignore[attr-defined]  # marks the guard as installed
    Consumer.create_task_handler = create_task_handler


def _refuse(consumer: Consumer, message) -> None:
    job_id = message.headers.get("id")
    log.error("refused a message whose task header is %s, not a task name (job id %r)",
              type(message.headers["task"]).__name__, job_id)
    if isinstance(job_id, str):
        error = JobFailedError(ErrorCode.INVALID_INPUT.value, "malformed message header(s): task",
                               {"headers": {"task": repr(message.headers["task"])[:200]}})
        consumer.app.backend.store_result(job_id, error, states.FAILURE)
    consumer.on_unknown_message(None, message)
