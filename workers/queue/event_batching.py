"""Task events sent together: one PUBLISH carries the events of many jobs.

Celery already buffers task events (``task-received``, ``task-started``, ``task-succeeded``...)
when the worker has an event loop, but asks the loop to flush after every single event, so
each event becomes one PUBLISH. ``EventBatching``, a consumer bootstep (Celery's documented
extension point), turns that into a flush every ``EVENT_FLUSH_S`` seconds from a thread of
its own (and whenever Celery's ``buffer_limit`` of 24 events fills): every event still
arrives, as Celery's ``task.multi`` batch that Flower and ``celery events`` read, at most
``EVENT_FLUSH_S`` later.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

#: Longest an event waits in the buffer (s).
EVENT_FLUSH_S = 0.1


class EventBatching(bootsteps.StartStopStep):
    """Flush the consumer's buffered task events on a timer instead of after each event."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, consumer: Any, **kwargs: Any):
        super().__init__(consumer, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, consumer: Any) -> None:
        dispatcher = consumer.event_dispatcher
        if dispatcher is None or not dispatcher.buffer_group:
            return
        dispatcher.on_send_buffered = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._flush_forever, args=(consumer,), name="event-flush", daemon=True)
        self._thread.start()

    def _flush_forever(self, consumer: Any) -> None:
        while not self._stop.wait(EVENT_FLUSH_S):
            dispatcher = consumer.event_dispatcher
            if dispatcher is None:
                continue
            try:
                dispatcher.flush()
            except Exception as exc:  # noqa: BLE001 - events are best effort; the next flush retries
                log.warning("flushing task events failed: %s", exc)

    def stop(self, consumer: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None
        if consumer.event_dispatcher is not None:
            consumer._flush_events()

