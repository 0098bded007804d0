"""Backpressure without reading the queue on every job: a depth estimate per queue. No I/O.

The client reads a queue's depth (4 LLENs: one list per priority step) at most every
``refresh_s`` seconds and adds its own submissions since; a submission that the estimate admits
sends no command for the check. Before refusing (``QueueFullError``) the client always reads the
depth afresh, so a refusal is never based on an old figure. What other producers enqueue within
``refresh_s`` is not seen: the queue can exceed ``max_queue_depth`` by that much.
"""

from __future__ import annotations

import threading


class DepthEstimates:
    """Per queue: the depth last read, when (monotonic s), and this client's submissions since."""

    def __init__(self, refresh_s: float):
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._read: dict[str, tuple[int, float]] = {}
        self._added: dict[str, int] = {}

    def estimate(self, queue: str, now: float) -> int | None:
        """The estimated depth of ``queue``, or None when it must be read (never read, or too old)."""
        with self._lock:
            read = self._read.get(queue)
            if read is None or now - read[1] > self.refresh_s:
                return None
            return read[0] + self._added.get(queue, 0)

    def record_read(self, queue: str, depth: int, now: float) -> None:
        """``depth`` was just read from Redis."""
        with self._lock:
            self._read[queue] = (depth, now)
            self._added[queue] = 0

    def record_added(self, queue: str, count: int) -> None:
        """This client enqueued ``count`` more jobs on ``queue``."""
        with self._lock:
            self._added[queue] = self._added.get(queue, 0) + count
