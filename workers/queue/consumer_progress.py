"""A Celery consumer bootstep that reports the consumer loop's progress and whether it consumes.

Added with ``app.steps["consumer"].add(consumer_progress_step(...))`` before the worker starts
(Celery's documented extension point for consumer bootsteps). Once the consumer has connected and
its task consumer runs, the step ticks ``part`` on a ``Liveness`` at every turn of the event loop
(kombu's ``Hub.on_tick``; an idle loop turns at least once a second) and sets ``consuming``. When
the consumer stops, on a lost broker connection (Celery restarts the consumer blueprint, which
stops its steps, and reconnects) or at shutdown, it clears ``consuming`` and pauses the part: a
worker waiting for Redis is unready, not unlive.
"""

from __future__ import annotations

from typing import Callable

from celery import bootsteps


def consumer_progress_step(liveness, consuming: Callable[[bool], None], part: str = "consumer") -> type:
    """A consumer bootstep class bound to ``liveness`` (``tick``/``pause``) and ``consuming(bool)``."""

    class ConsumerProgress(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, c) -> None:
            if c.hub is not None:
                c.hub.on_tick.add(self.tick)
                liveness.tick(part)
            consuming(True)

        def stop(self, c) -> None:
            consuming(False)
            liveness.pause(part)
            if c.hub is not None:
                c.hub.on_tick.discard(self.tick)

        shutdown = stop

        def tick(self) -> None:
            liveness.tick(part)

    return ConsumerProgress
