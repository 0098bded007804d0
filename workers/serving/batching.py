"""A dynamic batcher: many task threads submit items, one device thread runs them in batches.

Each caller gets one ``Future`` per item. A background thread forms a batch when
``max_batch_size`` items are waiting or the oldest has waited ``max_wait_s``, whichever
comes first (Ray Serve's ``@serve.batch`` and Triton's dynamic batcher follow the same rule).
With the default ``wait_policy="adaptive"`` it also stops waiting early when no further item
is expected before the deadline (see ``WAIT_POLICIES``): a lone job at low load runs at once
instead of idling for ``max_wait_s``, while under load batches still fill.

Items waiting together (up to ``sort_window_batches * max_batch_size``) are sorted by
``cost`` (token length) before they are cut into batches, so each batch holds inputs of
similar length and padding stays small.

Failure isolation: if a batch raises, it is split in halves and each half retried, so one
poisoned item fails alone and CUDA out-of-memory shrinks the batch instead of killing the
worker (later batches are capped at the size that fitted, and the cap is relaxed again after
a run of successes). If the batch function returns the wrong number of outputs, every item
of that batch fails with ``BatchContractError``. No caller ever hangs: an unexpected error in
the device thread fails the items it held, and a stopped batcher fails everything queued.

Nothing here imports torch: the batch function owns the device.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from collections.abc import Sequence as SequenceABC
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: How many times ``max_batch_size`` items one cycle may take off the queue to sort by cost.
SORT_WINDOW_BATCHES = 4

#: ``fixed``: wait for batch-mates until the batch is full or the oldest item has waited
#: ``max_wait_s`` (Triton's ``max_queue_delay``, Ray Serve's ``batch_wait_timeout_s``).
#: ``adaptive`` (default): the same two limits, but also dispatch as soon as the next arrival is
#: not expected before the deadline, judged from the recent gaps between arrivals, or once
#: arrivals have stopped for twice the usual gap. At low load this removes the wait entirely;
#: under load it behaves like ``fixed``.
WAIT_POLICIES = ("fixed", "adaptive")

#: Why a batch was dispatched (keys of ``BatchStats.dispatch``).
DISPATCH_REASONS = ("full", "timeout", "idle", "closing")

#: Adaptive policy: weight of the newest inter-arrival gap in the moving average.
_GAP_EWMA_ALPHA = 0.25
#: Adaptive policy: gaps longer than this (s) are clipped, so one long pause does not dominate.
_GAP_CLIP_S = 1.0
#: Adaptive policy: the shortest silence (s) that counts as "arrivals stopped".
_MIN_PATIENCE_S = 0.0005
#: After an out-of-memory split, relax the batch-size cap after this many successful batches.
OOM_CAP_RECOVERY_BATCHES = 50


class BatcherClosed(RuntimeError):
    """The batcher was stopped; the item was not run."""


class QueueFullError(RuntimeError):
    """The batcher already holds ``max_queue_size`` items."""


class BatchContractError(RuntimeError):
    """The batch function broke its contract (returned a wrong number of outputs, or not a sequence)."""


class BatcherConfigError(ValueError):
    """A ``DynamicBatcher`` argument is out of range or of the wrong type."""


@dataclass
class BatchStats:
    """Counters since start, updated by the device thread; read them with ``snapshot()``.

    ``items / batches`` is the mean real batch size. Queue time (submit to batch start) and
    compute time (inside the batch function) are kept apart, as Triton reports them.
    """

    batches: int = 0
    items: int = 0
    failed_items: int = 0
    splits: int = 0
    out_of_memory: int = 0
    contract_errors: int = 0
    last_batch_size: int = 0
    largest_batch_size: int = 0
    #: Current cap on batch size (``max_batch_size`` unless lowered after out-of-memory).
    batch_size_cap: int = 0
    queue_wait_s: float = 0.0
    compute_s: float = 0.0
    last_compute_s: float = 0.0
    dispatch: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISPATCH_REASONS, 0))

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy, with the derived means (batch size, queue and compute ms per item/batch)."""
        data = asdict(self)
        data["mean_batch_size"] = self.mean_batch_size
        data["mean_queue_wait_ms"] = 1000.0 * self.queue_wait_s / self.items if self.items else 0.0
        data["mean_compute_ms"] = 1000.0 * self.compute_s / self.batches if self.batches else 0.0
        return data


@dataclass
class _Item:
    payload: Any
    cost: float
    future: Future
    enqueued_at: float = field(default_factory=time.monotonic)
    context: Any = None
    isolated: bool = False


@dataclass(frozen=True)
class BatchInfo:
    """What the batch function is told about the batch it runs.

    ``enqueued_at``: each item's submit time (``time.monotonic()`` seconds); ``reason``: why the
    batch was dispatched (one of ``DISPATCH_REASONS``; halves retried after a failure keep it);
    ``contexts``: each item's ``context`` as given to ``submit`` (e.g. the submitting job's trace
    span context, for a batch span linked to every job in it).
    """

    enqueued_at: tuple[float, ...]
    reason: str = ""
    contexts: tuple[Any, ...] = ()


BatchFunction = Callable[[list[Any], BatchInfo], Sequence[Any]]
#: ``hook(name, info)`` returns a context manager entered around each run of the batch function
#: (e.g. a trace span for the batch); an exception from the batch function passes through it.
BatchHook = Callable[[str, BatchInfo], AbstractContextManager[Any]]


def no_hook(name: str, info: BatchInfo) -> AbstractContextManager[Any]:
    """The default ``batch_hook``: nothing around the batch function."""
    return nullcontext()


def chain_hooks(*hooks: BatchHook) -> BatchHook:
    """One ``batch_hook`` that enters ``hooks`` in order (and exits them in reverse) around a batch."""

    @contextmanager
    def chained(name: str, info: BatchInfo):
        with ExitStack() as stack:
            for hook in hooks:
                stack.enter_context(hook(name, info))
            yield

    return chained


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` (and MPS/CPU allocator "out of memory" errors)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


_is_out_of_memory = is_out_of_memory  # old name


def _check_config(name: Any, run_batch: Any, max_batch_size: Any, max_wait_s: Any, max_queue_size: Any,
                  on_out_of_memory: Any, wait_policy: Any, sort_window_batches: Any) -> None:
    """Refuse a bad configuration up front, naming the argument and what was wrong with it."""

    def integer(label: str, value: Any, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BatcherConfigError(f"{label} must be an int, got {type(value).__name__} {value!r}")
        if value < minimum:
            raise BatcherConfigError(f"{label} must be >= {minimum}, got {value}")

    if not isinstance(name, str) or not name:
        raise BatcherConfigError(f"name must be a non-empty string, got {name!r}")
    if not callable(run_batch):
        raise BatcherConfigError(f"run_batch must be callable, got {type(run_batch).__name__}")
    integer("max_batch_size", max_batch_size, 1)
    if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)):
        raise BatcherConfigError(f"max_wait_s must be a number of seconds, got {type(max_wait_s).__name__} "
                                 f"{max_wait_s!r}")
    if not math.isfinite(max_wait_s) or max_wait_s < 0:
        raise BatcherConfigError(f"max_wait_s must be finite and >= 0, got {max_wait_s}")
    integer("max_queue_size", max_queue_size, 1)
    if max_queue_size < max_batch_size:
        raise BatcherConfigError(f"max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size})")
    if on_out_of_memory is not None and not callable(on_out_of_memory):
        raise BatcherConfigError("on_out_of_memory must be callable or None")
    if wait_policy not in WAIT_POLICIES:
        raise BatcherConfigError(f"wait_policy must be one of {', '.join(WAIT_POLICIES)}, got {wait_policy!r}")
    integer("sort_window_batches", sort_window_batches, 1)


class DynamicBatcher:
    """Gathers items into batches for ``run_batch`` on one dedicated thread.

    ``run_batch(payloads, info)`` must return exactly one output per payload, in order.
    ``max_wait_s`` is measured from the oldest waiting item's arrival. ``batch_hook`` wraps each
    run of ``run_batch`` (see ``BatchHook``). Bad arguments raise ``BatcherConfigError`` (a
    ``ValueError``) before any thread starts.
    """

    def __init__(self, name: str, run_batch: BatchFunction, *, max_batch_size: int, max_wait_s: float,
                 max_queue_size: int = 100_000, on_out_of_memory: Callable[[], None] | None = None,
                 wait_policy: str = "adaptive", sort_window_batches: int = SORT_WINDOW_BATCHES,
                 batch_hook: BatchHook = no_hook):
        _check_config(name, run_batch, max_batch_size, max_wait_s, max_queue_size, on_out_of_memory,
                      wait_policy, sort_window_batches)
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = float(max_wait_s)
        self.wait_policy = wait_policy
        self.sort_window_batches = sort_window_batches
        self.stats = BatchStats(batch_size_cap=max_batch_size)
        self._stats_lock = threading.Lock()
        self._run_batch = run_batch
        self._batch_hook = batch_hook
        self._on_out_of_memory = on_out_of_memory
        self._cap = max_batch_size
        self._successes_at_cap = 0
        # Arrival statistics for the adaptive policy (written under _arrival_lock by submitters).
        self._arrival_lock = threading.Lock()
        self._last_arrival = float("-inf")
        self._gap_ewma = float("inf")
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue_size)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # --- callers ----------------------------------------------------------------------

    def submit(self, payloads: Sequence[Any], costs: Sequence[float] | None = None, *,
               context: Any = None, isolated: bool = False) -> list[Future]:
        """Queue ``payloads``; return one future per payload, in order.

        ``costs`` (e.g. token counts) order items within a batch window; ``context`` travels with
        every item to ``BatchInfo.contexts``. ``isolated`` items run each in a batch of its own (a
        job suspected of crashing the device must not take batch-mates down with it). Raises
        ``QueueFullError`` when the queue cannot take all of ``payloads`` (nothing is queued then),
        ``BatcherClosed`` once stopped.
        """
        if self._closed.is_set():
            raise BatcherClosed(f"batcher {self.name} is stopped")
        costs = costs if costs is not None else [0] * len(payloads)
        now = time.monotonic()
        items = [_Item(payload, cost, Future(), now, context, isolated)
                 for payload, cost in zip(payloads, costs, strict=True)]
        if len(items) > self._queue.maxsize - self._queue.qsize():
            raise QueueFullError(f"batcher {self.name} cannot take {len(items)} more items "
                                 f"(it holds {self._queue.qsize()} of {self._queue.maxsize})")
        self._note_arrivals(now, len(items))
        for item in items:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                error = QueueFullError(f"batcher {self.name} holds {self._queue.maxsize} items")
                for pending in items:  # those already queued are skipped by the device thread
                    _fail(pending, error)
                raise error from None
        if self._closed.is_set():  # raced with close(): fail what close() may not have drained
            self._fail_queued()
        return [item.future for item in items]

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch being run)."""
        return self._queue.qsize()

    def stats_snapshot(self) -> dict[str, Any]:
        """``stats.snapshot()`` taken consistently with the device thread, plus the queue depth."""
        with self._stats_lock:
            data = self.stats.snapshot()
        data["queue_depth"] = self.queue_depth
        data["max_batch_size"] = self.max_batch_size
        data["max_wait_ms"] = self.max_wait_s * 1000.0
        data["wait_policy"] = self.wait_policy
        return data

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after its current batch; items still queued fail with ``BatcherClosed``."""
        self._closed.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread is busy with a non-empty queue and checks _closed between batches
        self._thread.join(timeout)
        self._fail_queued()

    # --- the device thread ----------------------------------------------------------

    def _note_arrivals(self, now: float, count: int) -> None:
        with self._arrival_lock:
            if self._last_arrival > float("-inf"):
                gap = min(now - self._last_arrival, _GAP_CLIP_S)
                self._gap_ewma = gap if math.isinf(self._gap_ewma) else (
                    _GAP_EWMA_ALPHA * gap + (1 - _GAP_EWMA_ALPHA) * self._gap_ewma)
            if count > 1:  # items submitted together arrived with no gap between them
                self._gap_ewma = 0.0 if math.isinf(self._gap_ewma) else (
                    self._gap_ewma * (1 - _GAP_EWMA_ALPHA) ** (count - 1))
            self._last_arrival = now

    def _wait_budget(self, now: float, deadline: float) -> tuple[float, str]:
        """How long to wait for the next item (0: dispatch now) and, if 0, why."""
        remaining = deadline - now
        if remaining <= 0:
            return 0.0, "timeout"
        if self.wait_policy == "fixed":
            return remaining, ""
        gap, last = self._gap_ewma, self._last_arrival
        if last + gap > deadline:
            return 0.0, "idle"  # the next arrival is not expected before the deadline
        patience_until = last + max(2.0 * gap, _MIN_PATIENCE_S)
        if now >= patience_until:
            return 0.0, "idle"  # arrivals stopped
        return min(remaining, patience_until - now), ""

    def _take_nowait(self, gathered: list[_Item], limit: int) -> bool:
        """Move already-queued items into ``gathered`` up to ``limit``; False if the stop sentinel was seen."""
        while len(gathered) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            gathered.append(item)
        return True

    def _gather(self) -> tuple[list[_Item], str] | None:
        """Block for the first item, then gather batch-mates; None once stopped and nothing is left."""
        while True:
            if self._closed.is_set() and self._queue.empty():
                return None
            first = self._queue.get()
            if first is not None:
                break
            if self._closed.is_set():
                return None
        gathered = [first]
        cap = self._cap
        deadline = first.enqueued_at + self.max_wait_s
        reason = ""
        open_ = self._take_nowait(gathered, cap)
        while open_ and len(gathered) < cap:
            budget, reason = self._wait_budget(time.monotonic(), deadline)
            if budget <= 0:
                break
            try:
                item = self._queue.get(timeout=budget)
            except queue.Empty:
                continue  # re-judge: the deadline or the adaptive patience may have passed
            if item is None:
                open_ = False
                break
            gathered.append(item)
            open_ = self._take_nowait(gathered, cap)
        if len(gathered) >= cap:
            reason = "full"
        if not open_:
            reason = "closing"
        elif len(gathered) >= cap:
            # Take whatever else is already waiting, so that sorting by cost has more to choose from.
            open_ = self._take_nowait(gathered, cap * self.sort_window_batches)
        if not open_:
            self._closed.set()
        return gathered, reason or "timeout"

    def _loop(self) -> None:
        held: list[_Item] = []
        try:
            while True:
                gathered = self._gather()
                if gathered is None:
                    return
                held, reason = gathered
                live = [item for item in held if _claim(item)]
                for batch in self._cut(live):
                    self._run_guarded(batch, reason)
                held = []
        except BaseException as exc:  # the thread is dying: nobody may hang on its items
            log.exception("batcher %s: device thread stopped unexpectedly", self.name)
            self._closed.set()
            error = BatcherClosed(f"batcher {self.name} stopped: {type(exc).__name__}: {exc}")
            for item in held:
                _fail(item, error)
            self._fail_queued()
            raise

    def _cut(self, live: list[_Item]) -> list[list[_Item]]:
        """Sort by cost, cut into batches of at most the current cap, oldest batch first;
        isolated items alone."""
        shared = sorted((item for item in live if not item.isolated), key=lambda item: item.cost)
        cap = self._cap
        batches = [shared[start:start + cap] for start in range(0, len(shared), cap)]
        batches += [[item] for item in live if item.isolated]
        batches.sort(key=lambda batch: min(item.enqueued_at for item in batch))
        return batches

    def _run_guarded(self, batch: list[_Item], reason: str) -> None:
        try:
            self._run(batch, reason)
        except Exception as exc:  # a bug in bookkeeping must not strand callers
            log.exception("batcher %s: internal error on a batch of %d", self.name, len(batch))
            for item in batch:
                _fail(item, exc)

    def _run(self, batch: list[_Item], reason: str) -> None:
        info = BatchInfo(tuple(item.enqueued_at for item in batch), reason, tuple(item.context for item in batch))
        started = time.monotonic()
        try:
            with self._batch_hook(self.name, info):
                outputs = self._run_batch([item.payload for item in batch], info)
        except Exception as exc:  # noqa: BLE001 - isolated below, then delivered to callers
            self._recover(batch, exc, reason)
            return
        finished = time.monotonic()
        with self._stats_lock:
            stats = self.stats
            stats.batches += 1
            stats.items += len(batch)
            stats.last_batch_size = len(batch)
            stats.largest_batch_size = max(stats.largest_batch_size, len(batch))
            stats.queue_wait_s += sum(started - item.enqueued_at for item in batch)
            stats.compute_s += finished - started
            stats.last_compute_s = finished - started
            stats.dispatch[reason] = stats.dispatch.get(reason, 0) + 1
        if not isinstance(outputs, SequenceABC) or len(outputs) != len(batch):
            got = f"{len(outputs)} outputs" if isinstance(outputs, SequenceABC) else type(outputs).__name__
            error = BatchContractError(f"batch function of {self.name} returned {got} for a batch of "
                                       f"{len(batch)} inputs; expected one output per input")
            log.error("%s", error)
            with self._stats_lock:
                self.stats.contract_errors += 1
                self.stats.failed_items += len(batch)
            for item in batch:
                _fail(item, error)
            return
        for item, output in zip(batch, outputs):
            if not item.future.done():
                item.future.set_result(output)
        self._relax_cap(len(batch))

    def _recover(self, batch: list[_Item], exc: Exception, reason: str) -> None:
        """Split a failed batch in halves and retry each, so the failure ends up with its cause alone."""
        if is_out_of_memory(exc):
            self._note_out_of_memory(len(batch))
        if len(batch) == 1:
            with self._stats_lock:
                self.stats.failed_items += 1
            _fail(batch[0], exc)
            return
        with self._stats_lock:
            self.stats.splits += 1
        middle = len(batch) // 2
        self._run(batch[:middle], reason)
        self._run(batch[middle:], reason)

    def _note_out_of_memory(self, size: int) -> None:
        self._cap = max(1, min(self._cap, size // 2))
        self._successes_at_cap = 0
        with self._stats_lock:
            self.stats.out_of_memory += 1
            self.stats.batch_size_cap = self._cap
        log.warning("batcher %s: out of memory on a batch of %d; splitting it and capping batches at %d",
                    self.name, size, self._cap)
        if self._on_out_of_memory is not None:
            try:
                self._on_out_of_memory()
            except Exception:  # a failing cleanup hook must not stop recovery
                log.exception("batcher %s: on_out_of_memory hook failed", self.name)

    def _relax_cap(self, size: int) -> None:
        if self._cap >= self.max_batch_size or size < self._cap:
            return
        self._successes_at_cap += 1
        if self._successes_at_cap >= OOM_CAP_RECOVERY_BATCHES:
            self._cap = min(self.max_batch_size, self._cap * 2)
            self._successes_at_cap = 0
            with self._stats_lock:
                self.stats.batch_size_cap = self._cap
            log.info("batcher %s: batch size cap raised to %d", self.name, self._cap)

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _fail(item, BatcherClosed(f"batcher {self.name} is stopped"))


def _claim(item: _Item) -> bool:
    """Mark the item's future running; False if its caller cancelled it or it already failed."""
    try:
        return item.future.set_running_or_notify_cancel()
    except RuntimeError:  # already finished (e.g. failed by a refused submission)
        return False


def _fail(item: _Item, exc: BaseException) -> None:
    try:
        if not item.future.done():
            item.future.set_exception(exc)
    except Exception:  # noqa: BLE001 - InvalidStateError: it was resolved concurrently
        pass
