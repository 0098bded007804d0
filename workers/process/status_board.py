"""The status board of one worker group: a small memory-mapped file its processes share.

A worker group (``fleet worker``) is a launcher, one device process and N consumer
processes (workers/process/worker_group.py). Each writes its own slots here and the
launcher reads them all, without a Redis command or a message:

* the device process: its pid and state, a tick every loop turn (liveness), and for each of
  its batchers the job ids of the batch it is computing right now and since when (monotonic
  seconds). After a crash the launcher reads which jobs were in compute: only those can have
  caused it (docs/RELIABILITY.md, "Attempts");
* each consumer: its pid and state, a tick from its Celery event loop, jobs in flight and done;
  the version of the group's serving plan it has applied (its model cards and queues,
  workers/serving/plan_follower.py) and how many jobs it still holds of queues it no longer
  consumes (a model being unloaded waits for them);
* each process's local metrics port when Prometheus export is on (the launcher's ``/metrics``
  gathers them, workers/process/group_probes.py).

Times are ``time.monotonic()`` seconds (CLOCK_MONOTONIC, one clock for every process of a
host). Slots are written by one process each; a reader may see a slot mid-update, which is
harmless for the counters and ticks, and the computing ids are only read once their writer
is dead. Nothing here imports torch or Celery.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

#: Batchers (models) per device whose computing batch is recorded.
COMPUTING_SLOTS = 8
#: Bytes per computing slot: a JSON list of job ids (256 UUIDs fit).
COMPUTING_BYTES = 12_288
#: Consumer processes per group at most.
MAX_CONSUMERS = 64

_MAGIC = b"FLEETSB1"
# device: pid, state, tick, batches done, metrics port; then per computing slot: started_at, length, bytes.
_DEVICE = struct.Struct("<qqdqq")
_SLOT_HEAD = struct.Struct("<dq")
# consumer: pid, state, tick, in_flight, jobs_done, metrics port; then its serving plan: version applied,
# jobs it holds of queues it no longer consumes.
_CONSUMER = struct.Struct("<qqdqqq")
_CONSUMER_PLAN = struct.Struct("<qq")
_CONSUMER_SIZE = _CONSUMER.size + _CONSUMER_PLAN.size
_HEADER = struct.Struct("<8sq")  # magic, consumers

_DEVICE_AT = _HEADER.size
_SLOTS_AT = _DEVICE_AT + _DEVICE.size
_SLOT_SIZE = _SLOT_HEAD.size + COMPUTING_BYTES
_CONSUMERS_AT = _SLOTS_AT + COMPUTING_SLOTS * _SLOT_SIZE


class State(IntEnum):
    """Where a process of the group is in its life."""

    STARTING = 0
    READY = 1
    DRAINING = 2
    STOPPED = 3
    FAILED = 4
    #: A consumer that is not consuming for now: connecting or reconnecting to the broker.
    WAITING = 5


@dataclass(frozen=True)
class Computing:
    """One status-board slot in use: which jobs it computes, since when (monotonic seconds)."""

    slot: int
    job_ids: list[str]
    started: float


@dataclass(frozen=True)
class DeviceStatus:
    pid: int
    state: State
    tick: float
    batches: int
    metrics_port: int
    computing: list[Computing]


@dataclass(frozen=True)
class ConsumerStatus:
    index: int
    pid: int
    state: State
    tick: float
    in_flight: int
    jobs_done: int
    metrics_port: int
    #: The serving plan version this consumer has applied (0: the one it started with).
    plan_version: int = 0
    #: Jobs it holds (received, not finished) from queues its plan no longer consumes.
    lingering: int = 0


class StatusBoard:
    """A view of the board file; ``create`` makes one, ``attach`` opens an existing one."""

    def __init__(self, path: Path, memory: mmap.mmap, consumers: int):
        self.path = path
        self._memory = memory
        self.consumers = consumers
        #: Serialises this process's writes (read, change, write back of a slot).
        self._write_lock = threading.Lock()

    @classmethod
    def create(cls, path: Path, consumers: int) -> StatusBoard:
        """Make a zeroed board for ``consumers`` consumer processes at ``path``."""
        if not 1 <= consumers <= MAX_CONSUMERS:
            raise ValueError(f"consumers must be 1..{MAX_CONSUMERS}, got {consumers}")
        with open(path, "wb") as handle:
            handle.truncate(_CONSUMERS_AT + consumers * _CONSUMER_SIZE)
        memory = _map(Path(path))
        _HEADER.pack_into(memory, 0, _MAGIC, consumers)
        return cls(Path(path), memory, consumers)

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> StatusBoard:
        """Open the board another process of the group created."""
        memory = _map(Path(path))
        magic, consumers = _HEADER.unpack_from(memory, 0)
        if magic != _MAGIC:
            raise ValueError(f"{path} is not a Fleet status board")
        return cls(Path(path), memory, consumers)

    def close(self) -> None:
        self._memory.close()

    # --- device process --------------------------------------------------------------------

    def set_device(self, state: State, pid: int | None = None, metrics_port: int | None = None) -> None:
        with self._write_lock:
            old_pid, _, _, batches, old_port = _DEVICE.unpack_from(self._memory, _DEVICE_AT)
            _DEVICE.pack_into(self._memory, _DEVICE_AT, pid if pid is not None else old_pid, int(state),
                              time.monotonic(), batches, metrics_port if metrics_port is not None else old_port)

    def device_tick(self) -> None:
        with self._write_lock:
            pid, state, _, batches, port = _DEVICE.unpack_from(self._memory, _DEVICE_AT)
            _DEVICE.pack_into(self._memory, _DEVICE_AT, pid, state, time.monotonic(), batches, port)

    def batch_started(self, slot: int, job_ids: list[str]) -> None:
        """Record that batcher ``slot`` now computes a batch of these jobs."""
        raw = json.dumps(job_ids, separators=(",", ":")).encode()
        if len(raw) > COMPUTING_BYTES:  # keep what fits; a crash then charges no one from this batch
            raw = b"[]"
        at = _SLOTS_AT + slot * _SLOT_SIZE
        self._memory[at + _SLOT_HEAD.size:at + _SLOT_HEAD.size + len(raw)] = raw
        _SLOT_HEAD.pack_into(self._memory, at, time.monotonic(), len(raw))

    def clear_computing(self, slot: int) -> None:
        """Slot ``slot`` computes nothing (its model was unloaded; the slot may serve another)."""
        _SLOT_HEAD.pack_into(self._memory, _SLOTS_AT + slot * _SLOT_SIZE, 0.0, 0)

    def batch_finished(self, slot: int) -> None:
        self.clear_computing(slot)
        with self._write_lock:
            pid, state, tick, batches, port = _DEVICE.unpack_from(self._memory, _DEVICE_AT)
            _DEVICE.pack_into(self._memory, _DEVICE_AT, pid, state, time.monotonic(), batches + 1, port)

    def device(self) -> DeviceStatus:
        pid, state, tick, batches, port = _DEVICE.unpack_from(self._memory, _DEVICE_AT)
        computing = []
        for slot in range(COMPUTING_SLOTS):
            at = _SLOTS_AT + slot * _SLOT_SIZE
            started, length = _SLOT_HEAD.unpack_from(self._memory, at)
            if length:
                raw = bytes(self._memory[at + _SLOT_HEAD.size:at + _SLOT_HEAD.size + length])
                try:
                    computing.append(Computing(slot, list(json.loads(raw)), started))
                except ValueError:  # caught mid-write; only a live device can be caught so
                    continue
        return DeviceStatus(pid, State(state), tick, batches, port, computing)

    # --- consumers ---------------------------------------------------------------------------

    def _consumer_at(self, index: int) -> int:
        if not 0 <= index < self.consumers:
            raise IndexError(f"consumer {index} of {self.consumers}")
        return _CONSUMERS_AT + index * _CONSUMER_SIZE

    def set_consumer(self, index: int, state: State, pid: int | None = None, metrics_port: int | None = None) -> None:
        at = self._consumer_at(index)
        with self._write_lock:
            old_pid, _, _, in_flight, done, old_port = _CONSUMER.unpack_from(self._memory, at)
            _CONSUMER.pack_into(self._memory, at, pid if pid is not None else old_pid, int(state), time.monotonic(),
                                in_flight, done, metrics_port if metrics_port is not None else old_port)

    def consumer_tick(self, index: int, in_flight: int, jobs_done: int) -> None:
        """The consumer's loop turned (or a job ended): its time and its job counts now."""
        at = self._consumer_at(index)
        with self._write_lock:
            pid, state, _, _, _, port = _CONSUMER.unpack_from(self._memory, at)
            _CONSUMER.pack_into(self._memory, at, pid, state, time.monotonic(), in_flight, jobs_done, port)

    def consumer_counts(self, index: int, in_flight: int, jobs_done: int) -> None:
        """The consumer's job counts now (a job ended), its tick unchanged: only its loop ticks it."""
        at = self._consumer_at(index)
        with self._write_lock:
            pid, state, tick, _, _, port = _CONSUMER.unpack_from(self._memory, at)
            _CONSUMER.pack_into(self._memory, at, pid, state, tick, in_flight, jobs_done, port)

    def consumer_plan(self, index: int, version: int, lingering: int) -> None:
        """The serving plan version consumer ``index`` has applied, and the jobs it still holds of
        queues that plan no longer consumes (written by the consumer only)."""
        _CONSUMER_PLAN.pack_into(self._memory, self._consumer_at(index) + _CONSUMER.size, version, lingering)

    def consumer(self, index: int) -> ConsumerStatus:
        at = self._consumer_at(index)
        pid, state, tick, in_flight, done, port = _CONSUMER.unpack_from(self._memory, at)
        plan_version, lingering = _CONSUMER_PLAN.unpack_from(self._memory, at + _CONSUMER.size)
        return ConsumerStatus(index, pid, State(state), tick, in_flight, done, port, plan_version, lingering)

    def all_consumers(self) -> list[ConsumerStatus]:
        return [self.consumer(index) for index in range(self.consumers)]


def _map(path: Path) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
