"""A consumer follows its group's serving plan: the models it answers for and the queues it consumes.

The launcher sends every new plan (workers/serving/serving_plan.py) down each consumer's pipe. A
thread here receives it and reads the tokenizer files of new text models (slow: off the event
loop); then, in the consumer's own event loop (Celery's ``consumer.call_soon``, as Celery's
``add_consumer`` control command does), the runtime adopts the plan and the consumer starts
consuming the queues it added (``add_task_queue``) and stops consuming those it dropped
(``cancel_task_queue``). Last, the consumer writes the plan's version on the status board: the
launcher waits for every consumer's before it announces a model (load) or frees one (unload).

While the consumer still holds jobs it received from a dropped queue (running, or received and
waiting for a thread), it counts them on the board (``lingering``) at every turn of its event loop;
the launcher lets a retiring model drain until no consumer holds any. Wired as a consumer
bootstep (Celery's documented extension point) that hands this object its consumer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from workers.process.status_board import StatusBoard
from workers.serving import ipc
from workers.serving.runtime import ConsumerRuntime, ModelCard
from workers.serving.serving_plan import ServingPlan

log = logging.getLogger(__name__)

#: Fewest seconds between two counts of lingering jobs.
COUNT_S = 0.1


class PlanFollower:
    """Keeps consumer ``index``'s runtime and queues in step with the plans arriving on ``plans`` (a pipe end).

    ``fixed_queues``: queues the consumer takes whatever the plan (training). ``on_plan(plan)`` runs in the
    event loop after each change of queues (the generation flow's shares follow the plan there).
    """

    def __init__(self, runtime: ConsumerRuntime, board: StatusBoard, index: int, plan: ServingPlan, plans: Any,
                 fixed_queues: set[str], on_plan: Callable[[ServingPlan], None] | None = None):
        self._runtime, self._board, self._index = runtime, board, index
        self._plans, self._fixed, self._on_plan = plans, fixed_queues, on_plan
        self.plan = plan
        #: The queues this consumer selected (Celery keeps the selection across reconnects).
        self._selected = plan.queues() | fixed_queues
        self._dropped: set[str] = set()
        #: A plan (and its new tokenisers) that arrived before the consumer started.
        self._pending: tuple[ServingPlan, dict[str, Any]] | None = None
        self._consumer: Any = None
        self._last_count = 0.0
        self._lock = threading.Lock()
        board.consumer_plan(index, plan.version, 0)

    @property
    def queues(self) -> list[str]:
        """The queues to start consuming with."""
        return sorted(self._selected)

    def listen(self) -> None:
        """Receive plans on a daemon thread until the pipe closes."""
        threading.Thread(target=self._receive, name="plan-follower", daemon=True).start()

    def step(self) -> type:
        """The consumer bootstep that hands this object its consumer (and again after a reconnect)."""
        follower = self

        class PlanFollowerStep(bootsteps.StartStopStep):
            requires = ("celery.worker.consumer.tasks:Tasks",)

            def start(self, consumer: Any) -> None:
                with follower._lock:
                    follower._consumer = consumer
                    pending, follower._pending = follower._pending, None
                if pending is not None:
                    follower._apply(*pending)
                if consumer.hub is not None:
                    consumer.hub.on_tick.add(follower._count_lingering)

            def stop(self, consumer: Any) -> None:
                if consumer.hub is not None:
                    consumer.hub.on_tick.discard(follower._count_lingering)

        return PlanFollowerStep

    # --- a thread: receive -------------------------------------------------------------------

    def _receive(self) -> None:
        while True:
            try:
                message = ipc.recv_json(self._plans)
            except (EOFError, OSError):
                return
            plan = ServingPlan.from_message(message)
            encoders = self._runtime.new_encoders(ModelCard.from_dict(card) for card in plan.cards.values())
            with self._lock:
                consumer = self._consumer
                if consumer is None:
                    self._pending = (plan, encoders)
                    continue
            consumer.call_soon(self._apply, plan, encoders)

    # --- the event loop: apply and count -----------------------------------------------------

    def _apply(self, plan: ServingPlan, encoders: dict[str, Any]) -> None:
        if plan.version <= self.plan.version:
            return
        self._runtime.adopt(plan, encoders)
        wanted = plan.queues() | self._fixed
        added, dropped = wanted - self._selected, self._selected - wanted
        for queue in sorted(added):
            self._consumer.add_task_queue(queue)
        for queue in sorted(dropped):
            self._consumer.cancel_task_queue(queue)
        self._selected = wanted
        self._dropped = (self._dropped | dropped) - wanted
        self.plan = plan
        if self._on_plan is not None:
            self._on_plan(plan)
        self._board.consumer_plan(self._index, plan.version, self._lingering())
        if added or dropped:
            log.info("serving plan %d: consuming %s%s", plan.version, ", ".join(sorted(added)) or "no new queue",
                     f"; stopped consuming {', '.join(sorted(dropped))}" if dropped else "")

    def _lingering(self) -> int:
        """Jobs this consumer received from queues it no longer consumes and has not finished."""
        if not self._dropped:
            return 0
        return sum(1 for request in _reserved() if (request.delivery_info or {}).get("routing_key") in self._dropped)

    def _count_lingering(self) -> None:
        now = time.monotonic()
        if not self._dropped or now - self._last_count < COUNT_S:
            return
        self._last_count = now
        lingering = self._lingering()
        self._board.consumer_plan(self._index, self.plan.version, lingering)
        if not lingering:
            self._dropped = set()


def _reserved() -> list[Any]:
    """Celery's reserved requests of this process (received and not finished), copied: task threads
    remove theirs as they finish, which can interrupt a copy; it is then taken again."""
    while True:
        try:
            return list(worker_state.reserved_requests)
        except RuntimeError:  # "set changed size during iteration"
            continue
