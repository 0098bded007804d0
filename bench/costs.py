"""What a job costs besides the model: Redis commands, redis-server CPU and worker CPU.

Two meters, read before and after a phase and divided by the jobs it completed:

* ``RedisMeter``: ``INFO commandstats`` (calls per command; commands that a Lua script runs
  count too) and ``INFO cpu`` (``used_cpu_sys`` + ``used_cpu_user`` of the redis-server
  process, seconds). Everything on the benchmark's private Redis is counted: client and
  worker together, plus the worker's background traffic (heartbeats, sweeps), which is why a
  phase must be long enough for that to be noise.
* ``ProcessTreeCPU``: user + system CPU seconds of a process and all its descendants, read
  from ``/proc`` (Linux), so a worker group's device process and consumers are summed.

No test asserts a figure from here; ``bench.run`` and ``bench.job_cost`` print them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import redis

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class RedisSnapshot:
    """Cumulative counters of one redis-server at one moment."""

    calls: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0

    def minus(self, earlier: RedisSnapshot) -> RedisSnapshot:
        calls = {name: count - earlier.calls.get(name, 0) for name, count in self.calls.items()}
        return RedisSnapshot({name: count for name, count in calls.items() if count}, self.cpu_s - earlier.cpu_s)


class RedisMeter:
    """Reads ``INFO commandstats`` and ``INFO cpu`` of the Redis at ``url``."""

    #: Commands the meter itself sends per snapshot (subtracted from every delta).
    OWN_COMMANDS = {"info": 2}

    def __init__(self, url: str):
        self._client = redis.Redis.from_url(url)

    def snapshot(self) -> RedisSnapshot:
        stats = self._client.info("commandstats")
        cpu = self._client.info("cpu")
        calls = {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}
        return RedisSnapshot(calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))

    def per_job(self, before: RedisSnapshot, after: RedisSnapshot, jobs: int) -> dict:
        """Commands per job (total and by command) and redis-server CPU per job (microseconds)."""
        delta = after.minus(before)
        for name, count in self.OWN_COMMANDS.items():
            if name in delta.calls:
                delta.calls[name] = max(0, delta.calls[name] - count)
        jobs = max(jobs, 1)
        by_command = {name: round(count / jobs, 2) for name, count in
                      sorted(delta.calls.items(), key=lambda kv: -kv[1]) if count}
        return {"commands_per_job": round(sum(delta.calls.values()) / jobs, 2), "by_command": by_command,
                "redis_cpu_us_per_job": round(1e6 * delta.cpu_s / jobs, 1)}

    def close(self) -> None:
        self._client.close()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime


class ProcessTreeCPU:
    """CPU seconds used by ``pid`` and its descendants (those alive when read)."""

    def __init__(self, pid: int):
        self.pid = pid

    def pids(self) -> list[int]:
        seen, stack = [], [self.pid]
        while stack:
            pid = stack.pop()
            seen.append(pid)
            stack += _children(pid)
        return seen

    def seconds(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self.pids())

    def rss_bytes(self) -> dict[int, int]:
        """Resident memory of every process of the tree, by pid."""
        sizes = {}
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        sizes[pid] = int(line.split()[1]) * 1024
            except OSError:
                pass
        return sizes


class PhaseCosts:
    """Costs of one benchmark phase: ``start()`` before it, ``finish(jobs)`` after it.

    ``worker_pid`` is the system's worker process (its descendants are counted too); the Redis
    counters are the whole server's, so only one system may run on it during a phase.
    """

    def __init__(self, redis_url: str, worker_pid: int):
        self._meter = RedisMeter(redis_url)
        self._tree = ProcessTreeCPU(worker_pid)
        self._start: tuple[RedisSnapshot, float] | None = None

    def start(self) -> None:
        self._start = (self._meter.snapshot(), self._tree.seconds())

    def finish(self, jobs: int) -> dict:
        """Commands and redis-server CPU per job (``RedisMeter.per_job``) and the worker's CPU per job (ms)."""
        if self._start is None:
            raise RuntimeError("finish() before start()")
        redis_before, cpu_before = self._start
        costs = self._meter.per_job(redis_before, self._meter.snapshot(), jobs)
        costs["worker_cpu_ms_per_job"] = round(1000 * (self._tree.seconds() - cpu_before) / max(jobs, 1), 3)
        self._start = None
        return costs

    def close(self) -> None:
        self._meter.close()
