"""The client's one result subscription, as bookkeeping: who waits for which job, what arrived early. No I/O.

Each client PSUBSCRIBEs once to ``celery-task-meta-<prefix>*`` (its job ids start with its
prefix: ``producer/core/jobs.py``); one reader (a thread, or an asyncio task) hands every
message to ``ResultRouter.on_message``, which passes finished results to the waiters of that
job, or keeps them, bounded, until someone waits (a result can arrive before its waiter).
A wait then costs no Redis command at all: the published payload is the result.

The subscription starts at the client's first wait (a client that only submits never
receives results). When may a waiter rely on the push alone? When the job is the client's own
and the pattern subscription was confirmed before the job was published and has not been lost
since, and no early result was dropped from the bounded cache meanwhile. ``coverage()`` captures that state at
publish time; ``watch`` compares it with the current one and asks the caller to read the result
key (GET/MGET) when it changed. Other jobs (``client.job(id)``, caller-chosen ids) are watched
through a per-job SUBSCRIBE on the same connection; their key is read once Redis confirms the
subscription (``on_channel_confirmed``), so nothing published in between is missed.

Thread-safe: the reader and the waiters may run on different threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from producer.core.jobs import RESULT_KEY_PREFIX, job_id_of
from producer.core.results import ResultMeta, decode_meta

#: Called by the reader with (job id, finished result) for each job a waiter watches.
Deliver = Callable[[str, ResultMeta], None]

#: How long a client waits for Redis to confirm its result subscription when it first needs it (s).
SUBSCRIBE_CONFIRM_S = 5.0
#: Pause before a client's reader retries a lost subscription connection (s).
RECONNECT_PAUSE_S = 0.2
#: Keys per MGET and channels per SUBSCRIBE of a client's result reads.
KEYS_PER_COMMAND = 1000
#: Early results kept at most (count, and bytes of their payloads) before the oldest are dropped.
EARLY_RESULTS_MAX = 10_000
EARLY_RESULTS_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Coverage:
    """The subscription's state when a job was published (see the module docstring)."""

    epoch: int
    drops: int


@dataclass
class WatchPlan:
    """What the caller of ``watch`` must do: take ``ready`` now, read the result keys of ``read_now``,
    SUBSCRIBE to the channels of ``subscribe`` (job ids)."""

    ready: list[tuple[str, ResultMeta]] = field(default_factory=list)
    read_now: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)


class ResultRouter:
    """Routes the results pushed on one client's subscription to the waiters of each job."""

    def __init__(self, prefix: str, *, early_max: int = EARLY_RESULTS_MAX,
                 early_max_bytes: int = EARLY_RESULTS_MAX_BYTES):
        self.prefix = prefix
        #: The PSUBSCRIBE pattern that covers every job id this client generates.
        self.pattern = f"{RESULT_KEY_PREFIX}{prefix}*"
        self._early_max, self._early_max_bytes = early_max, early_max_bytes
        self._lock = threading.Lock()
        self._epoch = 0  # pattern subscriptions confirmed so far (0: never)
        self._drops = 0  # early results dropped so far
        self._waiters: dict[str, list[Deliver]] = {}
        self._early: OrderedDict[str, tuple[ResultMeta, int]] = OrderedDict()
        self._early_bytes = 0
        self._channels: dict[str, int] = {}  # foreign job id -> waits that subscribed its channel
        self._confirmed: set[str] = set()  # foreign channels Redis confirmed on the current connection

    def coverage(self) -> Coverage | None:
        """The state to record with a job published now; None while the pattern is not subscribed."""
        with self._lock:
            return Coverage(self._epoch, self._drops) if self._epoch else None

    def watch(self, waits: Iterable[tuple[str, Coverage | None]], deliver: Deliver) -> WatchPlan:
        """Register ``deliver`` for each (job id, coverage at publish; None if not published here)."""
        plan = WatchPlan()
        with self._lock:
            current = Coverage(self._epoch, self._drops)
            for job_id, coverage in waits:
                early = self._early.pop(job_id, None)
                if early is not None:
                    self._early_bytes -= early[1]
                    plan.ready.append((job_id, early[0]))
                    continue
                self._waiters.setdefault(job_id, []).append(deliver)
                if job_id.startswith(self.prefix) and self._epoch:
                    if coverage != current:
                        plan.read_now.append(job_id)  # published before a gap in the push: read it
                elif job_id in self._channels:
                    self._channels[job_id] += 1
                    if job_id in self._confirmed:
                        plan.read_now.append(job_id)
                else:
                    self._channels[job_id] = 1
                    plan.subscribe.append(job_id)
        return plan

    def unwatch(self, job_ids: Iterable[str], deliver: Deliver) -> list[str]:
        """Remove ``deliver``; return the job ids whose channel nobody needs any more (to UNSUBSCRIBE)."""
        idle = []
        with self._lock:
            for job_id in job_ids:
                waiting = self._waiters.get(job_id)
                if waiting and deliver in waiting:
                    waiting.remove(deliver)
                    if not waiting:
                        del self._waiters[job_id]
                count = self._channels.get(job_id)
                if count is not None:
                    if count > 1:
                        self._channels[job_id] = count - 1
                    else:
                        del self._channels[job_id]
                        self._confirmed.discard(job_id)
                        idle.append(job_id)
        return idle

    def on_message(self, channel: bytes | str, payload: bytes | str) -> None:
        """A message on the subscription: route a finished result, keep it early, or ignore it."""
        meta = decode_meta(payload)
        if meta is None or not meta.ready:
            return  # STARTED, PROGRESS, RETRY: not an outcome
        job_id = job_id_of(channel)
        with self._lock:
            waiting = list(self._waiters.get(job_id, ()))
            if not waiting and job_id.startswith(self.prefix):
                self._keep_early(job_id, meta, len(payload))
        for deliver in waiting:
            deliver(job_id, meta)

    def on_read(self, pairs: Iterable[tuple[str, bytes | None]]) -> None:
        """Results read from their keys (GET/MGET): finished ones go to their waiters."""
        for job_id, payload in pairs:
            meta = decode_meta(payload)
            if meta is None or not meta.ready:
                continue
            with self._lock:
                waiting = list(self._waiters.get(job_id, ()))
            for deliver in waiting:
                deliver(job_id, meta)

    def on_pattern_confirmed(self) -> list[str]:
        """Redis confirmed the pattern subscription; return the jobs whose keys must be read now
        (after a reconnect: every watched job, since results published during the gap were lost)."""
        with self._lock:
            self._epoch += 1
            return list(self._waiters) if self._epoch > 1 else []

    def on_channel_confirmed(self, channel: bytes | str) -> list[str]:
        """Redis confirmed a per-job SUBSCRIBE; return the job ids to read now (those still watched)."""
        job_id = job_id_of(channel)
        with self._lock:
            if job_id not in self._channels:
                return []
            self._confirmed.add(job_id)
            return [job_id] if job_id in self._waiters else []

    def on_connection_lost(self) -> None:
        """The subscription's connection failed: per-job channels need a new confirmation before reads."""
        with self._lock:
            self._confirmed.clear()

    def _keep_early(self, job_id: str, meta: ResultMeta, size: int) -> None:
        previous = self._early.pop(job_id, None)
        if previous is not None:
            self._early_bytes -= previous[1]
        self._early[job_id] = (meta, size)
        self._early_bytes += size
        while self._early and (len(self._early) > self._early_max or self._early_bytes > self._early_max_bytes):
            _, (_, dropped_size) = self._early.popitem(last=False)
            self._early_bytes -= dropped_size
            self._drops += 1
