"""One synchronous face for both clients, so that one test body runs against each.

``BlockingAsyncClient`` drives an ``AsyncFleetClient`` on an event loop of its own (a thread):
every awaitable it returns is awaited there, every async iterator collected into a list, and
``AsyncJobHandle`` objects come back wrapped the same way, so ``client.embed(...).result()``
reads the same for ``FleetClient`` and ``AsyncFleetClient``. Concurrent calls from several
threads run as concurrent coroutines on that one loop.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from producer import AsyncFleetClient, AsyncJobHandle
from producer.settings import FleetSettings


class LoopThread:
    """An event loop running forever on a daemon thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, awaitable: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


async def _collected(iterator: Any) -> list[Any]:
    return [item async for item in iterator]


class Blocking:
    """A synchronous view of an asyncio object (see the module docstring)."""

    def __init__(self, target: Any, loop: LoopThread):
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            result = value(*(_unwrap(arg) for arg in args), **{key: _unwrap(arg) for key, arg in kwargs.items()})
            if inspect.isasyncgen(result):
                return iter(self._wrap(self._loop.run(_collected(result))))
            if inspect.isawaitable(result):
                result = self._loop.run(result)
            return self._wrap(result)

        return call

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, AsyncJobHandle):
            return Blocking(value, self._loop)
        if isinstance(value, (list, tuple)):
            return type(value)(self._wrap(item) for item in value)
        return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Blocking):
        return value._target
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(item) for item in value)
    return value


class BlockingAsyncClient(Blocking):
    """An ``AsyncFleetClient`` with a synchronous face and its own event loop."""

    def __init__(self, settings: FleetSettings):
        loop = LoopThread()
        super().__init__(loop.run(_construct(settings)), loop)

    def close(self) -> None:
        self._loop.run(self._target.close())
        self._loop.stop()


async def _construct(settings: FleetSettings) -> AsyncFleetClient:
    return AsyncFleetClient(settings=settings)  # built on the loop it will run on
