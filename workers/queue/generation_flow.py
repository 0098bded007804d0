"""Generate jobs beyond the engine's free slots wait in Redis, not in a consumer.

A generation engine (workers/serving/generation/) decodes at most ``max_sequences`` jobs of a
model at once. Were a consumer to take more generate messages than that, the surplus would
wait in the consumer (holding task threads and prefetch slots, invisible to autoscalers, and in
arrival order rather than priority order). So each consumer of a group holds at most its share
of the model's slots, ``ceil(max_sequences / consumers)``: when a received generate job fills
its share, the consumer stops consuming that model's queue (Celery's ``cancel_task_queue``,
from the consumer's own event loop, so the next BRPOP no longer includes it); when one of its
generate jobs ends, it consumes the queue again (``add_task_queue``). Jobs left in Redis are
taken in priority order when a slot frees, and other models' queues are never held up.

Wired with Celery's documented ``task_received`` and ``task_postrun`` signals and one consumer
bootstep (``GenerationFlow.step``) that gives it the consumer.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from celery import bootsteps, signals

log = logging.getLogger(__name__)


class GenerationFlow:
    """Per generate queue, this consumer's share of the engine's slots and its jobs holding one."""

    def __init__(self, slots_by_queue: dict[str, int], consumers: int):
        self._consumers = max(1, consumers)
        self.shares = {queue: max(1, math.ceil(slots / self._consumers)) for queue, slots in slots_by_queue.items()}
        self._held = dict.fromkeys(self.shares, 0)
        self._jobs: dict[str, str] = {}  # job id -> queue, for the jobs holding a share
        self._lock = threading.Lock()
        self._consumer: Any = None
        self._connected = False

    def update(self, slots_by_queue: dict[str, int]) -> None:
        """Follow the group's serving plan (a generate model loaded or unloaded while the consumer runs;
        called in its event loop): shares for the queues it now consumes, none for those it dropped."""
        with self._lock:
            self.shares = {queue: max(1, math.ceil(slots / self._consumers)) for queue, slots in slots_by_queue.items()}
            for queue in self.shares:
                self._held.setdefault(queue, 0)
        if self.shares:
            self.connect()

    @property
    def extra_threads(self) -> int:
        """Task threads the shares need on top of the other models' concurrency."""
        return sum(self.shares.values())

    def held(self, queue: str) -> int:
        with self._lock:
            return self._held[queue]

    def step(self) -> type:
        """The consumer bootstep that hands this object its consumer."""
        flow = self

        class GenerationFlowStep(bootsteps.StartStopStep):
            requires = ("celery.worker.consumer.tasks:Tasks",)

            def start(self, consumer: Any) -> None:
                flow._consumer = consumer
                for queue in flow.shares:  # after a reconnect: consume again what is not full
                    if flow.held(queue) >= flow.shares[queue]:
                        consumer.cancel_task_queue(queue)

        return GenerationFlowStep

    def connect(self) -> None:
        if self._connected:
            return
        self._connected = True
        signals.task_received.connect(self._on_received, weak=False)
        signals.task_postrun.connect(self._on_postrun, weak=False)

    def _on_received(self, request: Any = None, **_: Any) -> None:
        """In the consumer's event loop: count the job; stop consuming its queue once the share is full."""
        queue = (getattr(request, "delivery_info", None) or {}).get("routing_key")
        if queue not in self.shares:
            return
        with self._lock:
            self._jobs[request.id] = queue
            self._held[queue] += 1
            full = self._held[queue] == self.shares[queue]
        if full and self._consumer is not None:
            self._consumer.cancel_task_queue(queue)

    def _on_postrun(self, task_id: str | None = None, **_: Any) -> None:
        """In a task thread: free the share; have the event loop consume the queue again if it was full."""
        with self._lock:
            queue = self._jobs.pop(task_id or "", None)
            if queue is None:
                return
            was_full = self._held[queue] == self.shares.get(queue)  # no share: a queue no longer consumed
            self._held[queue] -= 1
        consumer = self._consumer
        if was_full and consumer is not None and consumer.hub is not None:
            consumer.hub.call_soon(consumer.add_task_queue, queue)
