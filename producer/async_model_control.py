"""``AsyncFleetClient.models``: the calls of ``FleetClient.models`` (producer/model_control.py), awaitable.

Over the same core (``producer/core/model_control.py``). The heartbeats are read and the command is
broadcast on threads (kombu has no asyncio API); replies are awaited with the client's asyncio
Redis connections, so no call blocks the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from producer.contract.lifecycle import ModelCommand, ModelCommandReply, ModelOp
from producer.core import model_control as core
from producer.core.catalog import CatalogEntry
from producer.core.model_control import COMMAND_TIMEOUT_S
from producer.publishing import Publisher


class AsyncModelControl:
    """``client.models`` of an ``AsyncFleetClient``: ``await client.models()`` for the catalog,
    ``await client.models.load(name)``, ``.unload(name)``, ``.switch(name, to=version)`` (arguments, replies
    and errors as ``FleetClient.models``).

    ``in_thread(function, *args)`` runs blocking publisher I/O off the loop; ``blpop(key, timeout)`` pops a
    reply with the client's asyncio connections.
    """

    def __init__(self, publisher: Publisher, in_thread: Callable[..., Awaitable[Any]],
                 blpop: Callable[[str, float], Awaitable[Any]]):
        self._publisher = publisher
        self._in_thread = in_thread
        self._blpop = blpop

    async def __call__(self) -> dict[str, CatalogEntry]:
        result: dict[str, CatalogEntry] = await self._in_thread(self._publisher.models)
        return result

    async def workers(self) -> list[core.WorkerView]:
        """The live worker groups, read now."""
        return core.parse_workers(await self._in_thread(self._publisher.heartbeats))

    async def load(self, model: str, *, workers: str | Sequence[str] | None = None,
                   timeout: float = COMMAND_TIMEOUT_S) -> list[ModelCommandReply]:
        """As ``FleetClient.models.load``."""
        return await self.send(core.new_command(ModelOp.LOAD, model), workers, timeout)

    async def unload(self, model: str, *, workers: str | Sequence[str] | None = None,
                     drain_grace_s: float | None = None, timeout: float = COMMAND_TIMEOUT_S) -> list[ModelCommandReply]:
        """As ``FleetClient.models.unload``."""
        return await self.send(core.new_command(ModelOp.UNLOAD, model, drain_grace_s=drain_grace_s), workers, timeout)

    async def switch(self, model: str, to: str, *, workers: str | Sequence[str] | None = None,
                     drain_grace_s: float | None = None, timeout: float = COMMAND_TIMEOUT_S
                     ) -> list[ModelCommandReply]:
        """As ``FleetClient.models.switch``."""
        return await self.send(core.new_command(ModelOp.SWITCH, model, to, drain_grace_s), workers, timeout)

    async def send(self, command: ModelCommand, workers: str | Sequence[str] | None,
                   timeout: float) -> list[ModelCommandReply]:
        """As ``ModelControl.send``."""
        targets = core.select_workers(await self.workers(), command, workers)
        replies = core.Replies(command, targets, time.monotonic() + timeout)
        arguments = replies.broadcast(time.monotonic())
        broadcast = self._publisher.app.control.broadcast
        replies.accept_acks(await asyncio.to_thread(broadcast, arguments.pop("command"), **arguments))
        while (block := replies.next_wait(time.monotonic())) is not None:
            popped = await self._blpop(replies.key, block)
            if popped is not None:
                replies.accept_reply(popped[1])
        return replies.result()
