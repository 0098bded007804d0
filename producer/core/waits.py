"""Waiting for jobs, as state machines the sync and asyncio clients drive with their own I/O. No I/O.

``Wait`` follows many jobs at once (``result``, ``gather``, ``as_completed``): its ``step`` says
what to do next (outcomes to hand out, jobs to mark expired, keys to re-read, how long to block
on the inbox) and the client does it. ``StreamCursor`` does the same for one job's token stream.

Timing: a wait ends with ``JobTimeoutError`` for the jobs still unfinished when its ``timeout``
runs out; the clients block on their inbox for at most the time left, so it ends on time except
while a Redis command is in flight (bounded by the client's socket timeout, ``WAIT_SOCKET_TIMEOUT_S``).
A job whose deadline passes while someone waits for it is marked ``EXPIRED`` at its deadline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from producer.core.results import ResultMeta, decode_meta, outcome
from producer.core.router import Coverage
from producer.errors import JobTimeoutError

#: The job-record fields a client reads about a job it did not submit itself.
RECORD_FIELDS = ("kind", "expires", "stream")
#: While waiting, re-read the results still pending this often (s): a safety net under the push.
RECHECK_S = 5.0
#: Longest single block on an XREAD (s); the socket timeout of the connection must exceed it.
STREAM_BLOCK_SLICE_S = 1.0


@dataclass(frozen=True)
class JobInfo:
    """What a client knows about a job: its ``kind`` (to type its result), its deadline (UNIX s),
    whether it streams, and the subscription ``coverage`` when it was published here (else None)."""

    kind: str | None = None
    expires_at: float | None = None
    streams: bool = False
    coverage: Coverage | None = None

    @classmethod
    def from_record(cls, values: Sequence[bytes | None]) -> JobInfo:
        """From the job record's ``RECORD_FIELDS`` (as HMGET returns them)."""
        kind, expires, stream = (value.decode() if value else None for value in values)
        return cls(kind=kind, expires_at=datetime.fromisoformat(expires).timestamp() if expires else None,
                   streams=stream == "1")


@dataclass
class Step:
    """What a waiting client does next, in this order: hand out ``emit``; mark the jobs of
    ``settle`` expired (and take the returned result); read the result keys of ``read``; stop if
    ``done``; else block on the inbox for up to ``pause`` seconds."""

    emit: list[tuple[Any, Any]] = field(default_factory=list)
    settle: list[str] = field(default_factory=list)
    read: list[str] = field(default_factory=list)
    done: bool = False
    pause: float = 0.0


class HandleBase:
    """What both clients' job handles hold: the job id, the client and what it knows of the job
    (``JobInfo``, None until read from the job record)."""

    def __init__(self, client: Any, job_id: str, info: JobInfo | None = None):
        self._client = client
        self.id = job_id
        self._info = info

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, kind={self.kind!r})"

    @property
    def kind(self) -> str | None:
        """The job's kind if known locally."""
        return None if self._info is None else self._info.kind


class Wait:
    """One wait for the outcomes of ``handles`` (objects with ``.id``; duplicates of an id count once)."""

    def __init__(self, handles: Iterable[Any], infos: dict[str, JobInfo], timeout: float | None, now: float):
        self.handles: dict[str, Any] = {}
        for handle in handles:
            self.handles.setdefault(handle.id, handle)
        self.infos = infos
        self.timeout = timeout
        self.pending = set(self.handles)
        self._deadline = None if timeout is None else now + timeout
        self._next_recheck = now + RECHECK_S
        #: Pending jobs with a deadline not yet marked: job id -> deadline (UNIX s).
        self._expiring: dict[str, float] = {job_id: expires_at for job_id in self.handles
                                            if (expires_at := infos[job_id].expires_at) is not None}
        self._ready: list[tuple[Any, Any]] = []

    def waits(self) -> list[tuple[str, Coverage | None]]:
        """(job id, coverage) of every job, for ``ResultRouter.watch``."""
        return [(job_id, self.infos[job_id].coverage) for job_id in self.handles]

    def accept(self, job_id: str, meta: ResultMeta | None) -> None:
        """A result for ``job_id``; kept as its outcome if it is finished and the job still pending."""
        if meta is None or not meta.ready or job_id not in self.pending:
            return
        self.pending.discard(job_id)
        self._expiring.pop(job_id, None)
        self._ready.append((self.handles[job_id], outcome(job_id, meta, self.infos[job_id].kind)))

    def accept_read(self, pairs: Iterable[tuple[str, bytes | None]]) -> None:
        """Results read from their keys (None: no result stored yet)."""
        for job_id, payload in pairs:
            self.accept(job_id, decode_meta(payload))

    def step(self, wall_now: float, now: float) -> Step:
        """The next thing to do (``wall_now``: UNIX time; ``now``: monotonic time, the clock of ``timeout``)."""
        step = Step(emit=self._ready)
        self._ready = []
        step.settle = [job_id for job_id, expires_at in self._expiring.items() if wall_now >= expires_at]
        for job_id in step.settle:  # marked once: if a worker started it meanwhile, its outcome comes later
            del self._expiring[job_id]
        if self.pending and now >= self._next_recheck:
            step.read = sorted(self.pending)
            self._next_recheck = now + RECHECK_S
        left = math.inf if self._deadline is None else self._deadline - now
        step.done = not self.pending or left <= 0
        next_expiry = min(self._expiring.values(), default=math.inf)
        step.pause = max(0.0, min(left, next_expiry - wall_now, self._next_recheck - now))
        return step

    def left(self, now: float) -> float | None:
        """Seconds until the wait's timeout (None: no timeout); what any Redis command it sends may take."""
        return None if self._deadline is None else max(0.0, self._deadline - now)

    def finish(self) -> list[tuple[Any, Any]]:
        """Outcomes not handed out yet, then ``JobTimeoutError`` for every job still unfinished."""
        leftovers, self._ready = self._ready, []
        timed_out = [(self.handles[job_id], JobTimeoutError(f"job {job_id} did not finish within {self.timeout} s"))
                     for job_id in sorted(self.pending)]
        self.pending.clear()
        return leftovers + timed_out


def raise_or_return(pairs: Sequence[tuple[object, BaseModel | BaseException]]) -> BaseModel:
    """The one outcome of a single-job wait: its result, or raise its error."""
    (_, result), = pairs
    if isinstance(result, BaseException):
        raise result
    return result


def ordered_outcomes(handles: Sequence[Any], outcomes: dict[str, Any], return_exceptions: bool) -> list[Any]:
    """``gather``'s answer: outcomes in handle order; unless ``return_exceptions``, raise the first error."""
    ordered = [outcomes[handle.id] for handle in handles]
    if not return_exceptions:
        for item in ordered:
            if isinstance(item, BaseException):
                raise item
    return ordered


class StreamCursor:
    """Following one job's token stream: position, end marker, and the wait for the next piece.

    ``timeout`` bounds the wait for each next piece (s); the stream ends at its ``done`` entry,
    which a worker writes after the last piece and a client writes when it cancels or expires a
    job that never started (``{"done": "1", "status": "cancelled" | "expired"}``).
    """

    def __init__(self, job_id: str, info: JobInfo, timeout: float | None, now: float):
        self.job_id, self.info, self.timeout = job_id, info, timeout
        self.last_id = "0-0"
        self.ended = False
        self._settled = False
        self._piece_deadline = None if timeout is None else now + timeout

    def block_ms(self, now: float) -> int:
        """How long the next XREAD may block, in ms (at least 1; at most ``STREAM_BLOCK_SLICE_S``)."""
        left = STREAM_BLOCK_SLICE_S if self._piece_deadline is None else self._piece_deadline - now
        return max(1, int(1000 * min(STREAM_BLOCK_SLICE_S, left)))

    def feed(self, entries: Iterable[tuple[Any, dict[bytes, bytes]]], now: float) -> list[str]:
        """The pieces among XREAD ``entries``; sets ``ended`` at the ``done`` entry."""
        pieces = []
        for entry_id, fields in entries:
            self.last_id = entry_id
            if b"done" in fields:
                self.ended = True
                break
            pieces.append(fields[b"piece"].decode())
        if pieces and self.timeout is not None:
            self._piece_deadline = now + self.timeout
        return pieces

    def settle_due(self, wall_now: float) -> bool:
        """True once, when the job's deadline has passed: mark it expired (a no-op if it started)."""
        if self._settled or self.info.expires_at is None or wall_now < self.info.expires_at:
            return False
        self._settled = True
        return True

    def timed_out(self, now: float) -> bool:
        return self._piece_deadline is not None and now >= self._piece_deadline

    def left(self, now: float) -> float | None:
        """Seconds until the wait for the next piece times out (None: no timeout)."""
        return None if self._piece_deadline is None else max(0.0, self._piece_deadline - now)

    def timeout_error(self) -> JobTimeoutError:
        return JobTimeoutError(f"no streamed output from job {self.job_id} within {self.timeout} s")
