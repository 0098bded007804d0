"""Group commit: the Redis writes that many task threads make at about the same time, in one round trip.

A consumer runs its jobs on many threads, and the jobs of one device batch finish together:
each stores its result, acknowledges its message, and (when it starts) records that it
started. Sent one by one, that is one Redis round trip (and one turn of the GIL) per job per
step. ``GroupCommit.execute`` instead queues the caller's commands; the first caller to
arrive becomes the *leader*, sends everything queued so far in one non-transactional
pipeline, hands each caller its own replies and wakes it; callers that arrived during that
round trip are sent together by the next leader (the first of them). At low load a caller
is its own leader and pays no hand-off; under load one round trip serves many jobs.

Commands of the same kind on the same key can also be *merged* across callers
(``merge={("zrem", key): [members]}``): they go as one command with every member
(``ZREM key m1 m2 ...``), for bookkeeping whose reply nobody needs (acks, pending-set removal).

Contract: ``execute`` returns once the caller's commands have run, with their replies in
order (a command error comes back as its exception object in that list); a connection
error that fails the pipeline is raised to every caller of that round trip. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import redis

#: Commands that may be merged: their arguments after the key are members, their replies unused.
MERGEABLE = ("zrem", "hdel", "srem")

QueueCommands = Callable[[Any], None]


class _Entry:
    __slots__ = ("queue", "merge", "done", "lead", "replies", "error")

    def __init__(self, queue: QueueCommands | None, merge: dict[tuple[str, str], Iterable[Any]] | None):
        self.queue = queue
        self.merge = merge
        self.done = threading.Event()
        self.lead = False
        self.replies: list[Any] = []
        self.error: BaseException | None = None


class GroupCommit:
    """Coalesces concurrent callers' commands into shared pipeline round trips on ``client``."""

    def __init__(self, client: Callable[[], redis.Redis]):
        self._client = client
        self._lock = threading.Lock()
        self._pending: list[_Entry] = []
        self._flushing = False
        #: Round trips made and commands sent (for tests and benchmarks).
        self.round_trips = 0
        self.entries = 0

    def execute(self, queue: QueueCommands | None = None,
                merge: dict[tuple[str, str], Iterable[Any]] | None = None) -> list[Any]:
        """Run ``queue(pipe)``'s commands (and the ``merge`` members) with others'; return its replies."""
        if merge:
            unknown = [command for command, _ in merge if command not in MERGEABLE]
            if unknown:
                raise ValueError(f"cannot merge {unknown}; mergeable commands: {MERGEABLE}")
        entry = _Entry(queue, merge)
        with self._lock:
            self._pending.append(entry)
            if not self._flushing:
                self._flushing = entry.lead = True
        if not entry.lead:
            entry.done.wait()
        if entry.lead:
            self._flush()
        if entry.error is not None:
            raise entry.error
        return entry.replies

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            self._run(batch)
        except BaseException as exc:  # noqa: BLE001 - every caller of this round trip gets the failure
            for entry in batch:
                entry.error = exc
        finally:
            with self._lock:
                self.round_trips += 1
                self.entries += len(batch)
                successor: _Entry | None
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                else:
                    successor = None
                    self._flushing = False
            for entry in batch:
                entry.lead = False
                entry.done.set()
            if successor is not None:
                successor.done.set()  # it wakes as the next leader

    def _run(self, batch: list[_Entry]) -> None:
        merged: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for entry in batch:
            for target, members in (entry.merge or {}).items():
                merged[target].extend(members)
        with self._client().pipeline(transaction=False) as pipe:
            for (command, key), members in merged.items():
                getattr(pipe, command)(key, *members)
            spans = []
            for entry in batch:
                before = len(pipe.command_stack)
                if entry.queue is not None:
                    entry.queue(pipe)
                spans.append((before, len(pipe.command_stack)))
            replies = pipe.execute(raise_on_error=False) if pipe.command_stack else []
        for entry, (start, end) in zip(batch, spans):
            entry.replies = replies[start:end]
