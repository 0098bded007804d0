"""A dynamic batcher: many task threads submit items, one device thread runs them in batches.

Each caller gets one ``Future`` per item. A background thread forms a batch when
``max_batch_size`` items are waiting or the oldest has waited ``max_wait_s``, whichever
comes first (Ray Serve's ``@serve.batch`` and Triton's dynamic batcher follow the same rule).
Items waiting together are sorted by ``cost`` (token length) before they are cut into
batches, so padding stays small.

Failure isolation: if a batch raises, it is split in halves and each half retried, so one
poisoned item fails alone and CUDA out-of-memory shrinks the batch instead of killing the
worker. If the batch function returns the wrong number of outputs, every item of that batch
fails with ``BatchContractError``; no caller ever hangs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

#: How many times ``max_batch_size`` items one cycle may take off the queue to sort by cost.
SORT_WINDOW_BATCHES = 4


class BatcherClosed(RuntimeError):
    """The batcher was stopped; the item was not run."""


class QueueFullError(RuntimeError):
    """The batcher already holds ``max_queue_size`` items."""


class BatchContractError(RuntimeError):
    """The batch function broke its contract (returned a wrong number of outputs)."""


@dataclass
class BatchStats:
    """Counters since start. ``items`` / ``batches`` is the mean real batch size."""

    batches: int = 0
    items: int = 0
    splits: int = 0
    out_of_memory: int = 0
    last_batch_size: int = 0


@dataclass
class _Item:
    payload: Any
    cost: int
    future: Future
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchInfo:
    """What the batch function is told about the batch it runs: its items' enqueue times (monotonic s)."""

    enqueued_at: tuple[float, ...]


BatchFunction = Callable[[list[Any], BatchInfo], Sequence[Any]]


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class DynamicBatcher:
    """Gathers items into batches for ``run_batch`` on one dedicated thread.

    ``run_batch(payloads, info)`` must return exactly one output per payload, in order.
    ``max_wait_s`` is measured from the oldest waiting item's arrival.
    """

    def __init__(self, name: str, run_batch: BatchFunction, *, max_batch_size: int, max_wait_s: float,
                 max_queue_size: int = 100_000, on_out_of_memory: Callable[[], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue_size < max_batch_size:
            raise ValueError(f"max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size})")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._run_batch = run_batch
        self._on_out_of_memory = on_out_of_memory
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue_size)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, payloads: Sequence[Any], costs: Sequence[int] | None = None) -> list[Future]:
        """Queue ``payloads``; return one future per payload. Raises ``QueueFullError`` when full."""
        if self._closed.is_set():
            raise BatcherClosed(f"batcher {self.name} is stopped")
        costs = costs if costs is not None else [0] * len(payloads)
        items = [_Item(payload, cost, Future()) for payload, cost in zip(payloads, costs, strict=True)]
        for item in items:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                error = QueueFullError(f"batcher {self.name} holds {self._queue.maxsize} items")
                for pending in items:
                    if not pending.future.done() and pending.future.set_running_or_notify_cancel():
                        pending.future.set_exception(error)
                raise error from None
        return [item.future for item in items]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; items still queued fail with ``BatcherClosed``."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosed(f"batcher {self.name} is stopped"))

    # --- the device thread ----------------------------------------------------------

    def _gather(self) -> list[_Item] | None:
        first = self._queue.get()
        if first is None:
            return None
        gathered = [first]
        deadline = first.enqueued_at + self.max_wait_s
        while len(gathered) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            gathered.append(item)
        # Take whatever else is already waiting, so that sorting by cost has more to choose from.
        while len(gathered) < self.max_batch_size * SORT_WINDOW_BATCHES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            gathered.append(item)
        return gathered

    def _loop(self) -> None:
        while True:
            gathered = self._gather()
            if gathered is None:
                return
            live = [item for item in gathered if item.future.set_running_or_notify_cancel()]
            live.sort(key=lambda item: item.cost)
            for start in range(0, len(live), self.max_batch_size):
                self._run(live[start:start + self.max_batch_size])

    def _run(self, batch: list[_Item]) -> None:
        info = BatchInfo(tuple(item.enqueued_at for item in batch))
        try:
            outputs = self._run_batch([item.payload for item in batch], info)
        except Exception as exc:  # noqa: BLE001 - isolated below, then delivered to callers
            self._recover(batch, exc)
            return
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.last_batch_size = len(batch)
        if len(outputs) != len(batch):
            error = BatchContractError(
                f"model {self.name} returned {len(outputs)} outputs for a batch of {len(batch)} inputs")
            for item in batch:
                item.future.set_exception(error)
            return
        for item, output in zip(batch, outputs):
            item.future.set_result(output)

    def _recover(self, batch: list[_Item], exc: Exception) -> None:
        if _is_out_of_memory(exc):
            self.stats.out_of_memory += 1
            log.warning("batcher %s: out of memory on a batch of %d; splitting", self.name, len(batch))
            if self._on_out_of_memory is not None:
                self._on_out_of_memory()
        if len(batch) == 1:
            batch[0].future.set_exception(exc)
            return
        self.stats.splits += 1
        middle = len(batch) // 2
        self._run(batch[:middle])
        self._run(batch[middle:])
