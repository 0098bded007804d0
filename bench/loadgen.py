"""Load generation and measurement for ``bench.run``: closed-loop and open-loop job streams.

Jobs are published with Fleet's real client (``FleetClient.submit_many``, pipelined). Results
are observed by one ``PSUBSCRIBE celery-task-meta-*`` connection on the benchmark's private
Redis: the Celery Redis backend publishes every stored state on the result key's channel, so
one subscriber sees every completion without polling and without per-job subscriptions.
The subscriber reads the state from the head of the payload and fully decodes only a sample
(``check_every``), so the harness stays cheap and never becomes what is measured; a phase
with any failed or malformed result is reported as such.

Latency of a job: from its submission (closed loop) or its scheduled arrival time (open
loop, so that a slow system cannot hide queueing delay) to the moment its result was
published.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from producer import FleetClient
from producer.contract import ModelKind

_STATUS = re.compile(rb'"status":\s*"([A-Z_]+)"')
_READY = {b"SUCCESS", b"FAILURE", b"REVOKED"}
_PREFIX = b"celery-task-meta-"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), nearest-rank on sorted values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


@dataclass
class PhaseResult:
    """One measured phase of one system. Times in ms, rates per second."""

    system: str
    load: str
    jobs: int = 0
    texts_per_job: int = 1
    duration_s: float = 0.0
    throughput_jobs_s: float = 0.0
    throughput_texts_s: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_batch: float | None = None
    offered_rate: float | None = None
    failed: int = 0
    incomplete: int = 0
    harness_cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResultStream(threading.Thread):
    """Every finished job's (id, publish-observed time, state, payload-or-None), from one PSUBSCRIBE."""

    def __init__(self, redis_url: str, check_every: int = 10, check: Callable[[dict], str | None] | None = None):
        super().__init__(name="bench-results", daemon=True)
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe(_PREFIX.decode() + "*")
        while True:  # return only once Redis has registered the subscription
            message = self._pubsub.get_message(timeout=5)
            if message and message["type"] == "psubscribe":
                break
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._check_every = check_every
        self._check = check
        self._seen = 0
        self.bad: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if not message or message["type"] != "pmessage":
                continue
            received = time.perf_counter()
            data = message["data"]
            found = _STATUS.search(data[:64])
            state = found.group(1) if found else b"?"
            if state not in _READY:
                continue
            job_id = message["channel"][len(_PREFIX):].decode()
            self._seen += 1
            if state == b"SUCCESS" and self._check is not None and self._seen % self._check_every == 1:
                problem = self._check(json.loads(data)["result"])
                if problem:
                    self.bad.append(f"{job_id}: {problem}")
            self.events.put((job_id, received, state.decode()))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self._pubsub.close()
        self._client.close()

    def drain(self, timeout: float) -> list[tuple[str, float, str]]:
        """Events available now, waiting up to ``timeout`` s for the first one."""
        out = []
        try:
            out.append(self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait())
            while True:
                out.append(self.events.get_nowait())
        except queue.Empty:
            pass
        return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Load:
    """Drives one system: its requests (pre-validated), its client, the shared result stream."""

    def __init__(self, system: str, client: FleetClient, stream: ResultStream, requests: list,
                 texts_per_job: int = 1, stats: Callable[[], dict | None] | None = None, costs=None):
        self.system = system
        self.client = client
        self.stream = stream
        self.requests = requests
        self.texts_per_job = texts_per_job
        self._next = 0
        self._stats = stats or (lambda: None)
        #: ``bench.costs.PhaseCosts`` (or None): Redis commands, redis-server and worker CPU per job.
        self._costs = costs

    def _take(self, count: int) -> list:
        picked = [self.requests[(self._next + i) % len(self.requests)] for i in range(count)]
        self._next += count
        return picked

    def _submit(self, count: int) -> list[str]:
        return [h.id for h in self.client.submit_many(ModelKind.EMBED, self._take(count))]

    def _result(self, load: str, started: float, ended: float, latencies: list[float], failed: int,
                incomplete: int, cpu0: float, stats0: dict | None, offered: float | None = None,
                completed: int | None = None, costs: dict | None = None) -> PhaseResult:
        duration = max(ended - started, 1e-9)
        jobs = len(latencies) if completed is None else completed
        result = PhaseResult(
            system=self.system, load=load, jobs=jobs, texts_per_job=self.texts_per_job, duration_s=duration,
            throughput_jobs_s=jobs / duration, throughput_texts_s=jobs * self.texts_per_job / duration,
            p50_ms=_ms(percentile(latencies, 50)), p90_ms=_ms(percentile(latencies, 90)),
            p99_ms=_ms(percentile(latencies, 99)), offered_rate=offered, failed=failed, incomplete=incomplete,
            harness_cpu_s=_cpu_s() - cpu0)
        result.extra["load_average"] = os.getloadavg()[0]
        if costs is not None:
            result.extra["costs"] = costs
        # Near 1.0 would mean the load generator itself was the bottleneck of this phase.
        result.extra["harness_busy"] = result.harness_cpu_s / duration
        stats1 = self._stats()
        if stats0 is not None and stats1 is not None:
            batches = stats1["batches"] - stats0["batches"]
            items = stats1["items"] - stats0["items"]
            if batches > 0:
                result.mean_batch = items / batches
                compute_s = stats1["compute_s"] - stats0["compute_s"]
                result.extra["worker_compute_ms_per_batch"] = 1000.0 * compute_s / batches
                result.extra["worker_queue_ms_per_item"] = 1000.0 * (
                    stats1["queue_wait_s"] - stats0["queue_wait_s"]) / max(items, 1)
                result.extra["dispatch"] = {k: stats1["dispatch"].get(k, 0) - stats0["dispatch"].get(k, 0)
                                            for k in stats1["dispatch"]}
                result.extra["largest_batch"] = stats1.get("largest_batch_size")
        return result

    def closed(self, load: str, concurrency: int, *, duration_s: float | None = None, jobs: int | None = None,
               warmup_s: float = 1.0, drain_s: float = 30.0) -> PhaseResult:
        """Keep ``concurrency`` jobs in flight; measure after ``warmup_s`` for ``duration_s`` (or ``jobs`` jobs)."""
        cpu0, stats0 = _cpu_s(), None
        inflight: dict[str, float] = {}
        for job_id in self._submit(concurrency):
            inflight[job_id] = time.perf_counter()
        t0 = time.perf_counter()
        measure_from = t0 + warmup_s
        end = None if duration_s is None else measure_from + duration_s
        latencies: list[float] = []
        failed = 0
        measuring = False
        while True:
            now = time.perf_counter()
            if not measuring and now >= measure_from:
                measuring, stats0, measure_from = True, self._stats(), now
                if self._costs is not None:
                    self._costs.start()
                end = None if duration_s is None else now + duration_s
            if measuring and ((end is not None and now >= end) or (jobs is not None and len(latencies) >= jobs)):
                break
            if now - t0 > warmup_s + (duration_s or 0) + drain_s + 600:
                break
            done = 0
            for job_id, received, state in self.stream.drain(0.5):
                sent = inflight.pop(job_id, None)
                if sent is None:
                    continue
                done += 1
                if measuring:  # every completion inside the window counts (steady state)
                    latencies.append(received - sent)
                    failed += state != "SUCCESS"
            if done:
                submitted = time.perf_counter()
                for job_id in self._submit(done):
                    inflight[job_id] = submitted
        ended = time.perf_counter()
        costs = self._costs.finish(len(latencies)) if self._costs is not None and measuring else None
        self._wait_out(inflight, drain_s)
        return self._result(load, measure_from, ended, latencies, failed, 0, cpu0, stats0, costs=costs)

    def open(self, load: str, rate: float, duration_s: float, *, drain_s: float = 15.0, seed: int = 0) -> PhaseResult:
        """Poisson arrivals at ``rate`` jobs/s for ``duration_s``; latency from each scheduled arrival."""
        rng = random.Random(seed)
        schedule, t = [], 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= duration_s:
                break
            schedule.append(t)
        cpu0, stats0 = _cpu_s(), self._stats()
        if self._costs is not None:
            self._costs.start()
        inflight: dict[str, float] = {}
        latencies: list[float] = []
        failed = 0
        t0 = time.perf_counter()
        index = 0
        while True:
            now = time.perf_counter()
            if index < len(schedule):
                due = index
                while due < len(schedule) and t0 + schedule[due] <= now:
                    due += 1
                if due > index:
                    for job_id, offset in zip(self._submit(due - index), schedule[index:due]):
                        inflight[job_id] = t0 + offset
                    index = due
            elif not inflight or now > t0 + duration_s + drain_s:
                break
            wait = t0 + schedule[index] - time.perf_counter() if index < len(schedule) else 0.2
            for job_id, received, state in self.stream.drain(max(0.0, min(wait, 0.2))):
                scheduled = inflight.pop(job_id, None)
                if scheduled is not None:
                    latencies.append(received - scheduled)
                    failed += state != "SUCCESS"
        ended = time.perf_counter()
        incomplete = len(inflight)
        costs = self._costs.finish(len(latencies)) if self._costs is not None else None
        self._wait_out(inflight, 0)
        # Throughput of an open-loop phase: completions over the time it took to complete them.
        return self._result(load, t0, ended, latencies, failed, incomplete, cpu0, stats0, offered=rate, costs=costs)

    def _wait_out(self, inflight: dict[str, float], drain_s: float) -> None:
        """Let jobs still in flight finish (unmeasured), so the next phase starts clean."""
        deadline = time.perf_counter() + drain_s
        while inflight and time.perf_counter() < deadline:
            for job_id, _, _ in self.stream.drain(0.2):
                inflight.pop(job_id, None)
        if inflight:
            purge_queues(self.client)
        self.stream.drain(0)


def purge_queues(client: FleetClient) -> None:
    """Drop every queued message of every Fleet queue (used between phases when a system fell behind)."""
    r = client._redis
    for key in r.scan_iter(match="fleet.*"):
        if r.type(key) == b"list":
            r.delete(key)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds
