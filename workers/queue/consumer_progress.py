"""A Celery consumer bootstep that puts the consumer's progress on the group's status board.

Added with ``app.steps["consumer"].add(consumer_progress_step(...))`` before the worker starts
(Celery's documented extension point for consumer bootsteps). Once the consumer has connected
and its task consumer runs, the step marks the consumer ``READY`` and, at every turn of the
event loop (kombu's ``Hub.on_tick``; an idle loop turns at least once a second), ticks the board
with the jobs in flight and done, at most every ``TICK_S``. When the consumer stops, on a lost
broker connection (Celery restarts the consumer blueprint, which stops its steps, and
reconnects) or at shutdown, it marks it ``WAITING``: a consumer waiting for Redis makes the
group unready, never unlive (workers/process/group_probes.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import bootsteps

from workers.process.status_board import State, StatusBoard

#: Fewest seconds between two board ticks of one consumer.
TICK_S = 0.5


def consumer_progress_step(board: StatusBoard, index: int, counts: Callable[[], tuple[int, int]]) -> type:
    """A consumer bootstep class for consumer ``index``; ``counts()`` gives (jobs in flight, jobs done)."""

    class ConsumerProgress(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        last_tick = 0.0

        def start(self, c) -> None:
            board.set_consumer(index, State.READY)
            if c.hub is not None:
                c.hub.on_tick.add(self.tick)
            self.tick()

        def stop(self, c) -> None:
            if c.hub is not None:
                c.hub.on_tick.discard(self.tick)
            if board.consumer(index).state is State.READY:
                board.set_consumer(index, State.WAITING)

        def tick(self) -> None:
            now = time.monotonic()
            if now - self.last_tick >= TICK_S:
                self.last_tick = now
                board.consumer_tick(index, *counts())

    return ConsumerProgress
