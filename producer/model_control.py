"""``FleetClient.models``: the fleet's models, and the commands that load, unload and switch them on running workers.

Blocking I/O over ``producer/core/model_control.py`` (what a command is, where it goes, what the
answers say); ``producer/async_model_control.py`` is the asyncio twin. ``run_command`` is also how a
training job asks the ``--serve-trained`` workers to load the model it registered.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
from celery import Celery

from producer.contract.lifecycle import ModelCommand, ModelCommandReply, ModelOp
from producer.core.catalog import CatalogEntry
from producer.core.model_control import (
    COMMAND_TIMEOUT_S,
    Replies,
    WorkerView,
    new_command,
    parse_workers,
    select_workers,
)
from producer.publishing import Publisher
from producer.redis_connection import redis_errors


def run_command(app: Celery, redis_client: redis.Redis, command: ModelCommand, targets: list[str],
                timeout_s: float) -> list[ModelCommandReply]:
    """Send ``command`` to the worker groups ``targets`` (node names) and wait up to ``timeout_s`` seconds
    for their replies; one reply per target, in order (``no_reply`` for those that said nothing in time)."""
    replies = Replies(command, targets, time.monotonic() + timeout_s)
    arguments = replies.broadcast(time.monotonic())
    replies.accept_acks(app.control.broadcast(arguments.pop("command"), **arguments))
    while (block := replies.next_wait(time.monotonic())) is not None:
        popped = redis_client.blpop([replies.key], timeout=block)
        if popped is not None:
            replies.accept_reply(popped[1])
    return replies.result()


class ModelControl:
    """``client.models``. Call it for the catalog (``client.models()``: kind, queue, live, last seen per
    model); its methods send lifecycle commands (docs/PROTOCOL.md, "Model lifecycle") and return one
    ``ModelCommandReply`` per worker group the command went to.

    ``workers``: worker name patterns (``"fleet-gpu*"``, ``"fleet-cpu@host-a,trainer-*"``); without it a
    load goes to every live worker, an unload or switch to the workers serving the model. ``timeout``:
    seconds to wait for the replies (a group still working then is reported ``no_reply``).
    ``NoMatchingWorkerError`` when no live worker is chosen; ``InvalidRequestError`` for a bad name.
    """

    def __init__(self, publisher: Publisher, redis_client: redis.Redis):
        self._publisher = publisher
        self._redis = redis_client

    def __call__(self) -> dict[str, CatalogEntry]:
        return self._publisher.models()

    def workers(self) -> list[WorkerView]:
        """The live worker groups, read now."""
        return parse_workers(self._publisher.heartbeats())

    def load(self, model: str, *, workers: str | Sequence[str] | None = None,
             timeout: float = COMMAND_TIMEOUT_S) -> list[ModelCommandReply]:
        """Load ``model`` (a name, or ``name@version``) and serve it, beside what each worker serves."""
        return self.send(new_command(ModelOp.LOAD, model), workers, timeout)

    def unload(self, model: str, *, workers: str | Sequence[str] | None = None, drain_grace_s: float | None = None,
               timeout: float = COMMAND_TIMEOUT_S) -> list[ModelCommandReply]:
        """Stop serving ``model`` (a bare name of a versioned model: every version) and free its memory."""
        return self.send(new_command(ModelOp.UNLOAD, model, drain_grace_s=drain_grace_s), workers, timeout)

    def switch(self, model: str, to: str, *, workers: str | Sequence[str] | None = None,
               drain_grace_s: float | None = None, timeout: float = COMMAND_TIMEOUT_S) -> list[ModelCommandReply]:
        """Move the workers serving ``model`` to its version ``to`` without a moment unserved."""
        return self.send(new_command(ModelOp.SWITCH, model, to, drain_grace_s), workers, timeout)

    def send(self, command: ModelCommand, workers: str | Sequence[str] | None,
             timeout: float) -> list[ModelCommandReply]:
        """Send ``command`` to the chosen workers (``select_workers``) and wait for their replies."""
        targets = select_workers(self.workers(), command, workers)
        with redis_errors(self._publisher.settings.redis_url):
            return run_command(self._publisher.app, self._redis, command, targets, timeout)
