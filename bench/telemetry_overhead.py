"""What telemetry costs when it is off (no OTLP endpoint): job latency and per-call overhead.

    .venv/bin/python -m bench.telemetry_overhead [--jobs 300] [--block 25]

1. End to end: sequential ``client.embed([text]).result()`` round trips against a real
   ``fleet worker --device cpu --models minilm`` on a private redis-server, alternating in
   blocks (ABBA order) between today's ``FleetClient`` (telemetry off: ``setup_producer()`` in ``__init__``,
   the ``fleet_enqueued_at`` header in every message) and the code path before telemetry
   (the same client with the previous ``__init__``/``_submit``: no setup call, no header).
   Every OTEL_*/OTLP_* variable is removed first, for the worker too.
2. Per call: the added producer work (``setup_producer()`` + ``enqueue_headers()``) and the
   worker helpers (``current_span``, ``tokenize_span``, the batcher's ``BatchScope`` hook,
   ``forward_span``: the OpenTelemetry API's no-ops) while off, with ``timeit``.

Prints one table; docs/OBSERVABILITY.md quotes a run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path

import redis

from producer import FleetClient, keys
from producer.contract import TASK_FOR_KIND
from producer.settings import FleetSettings
from workers.process.launch import LaunchedWorker

REPO = Path(__file__).resolve().parent.parent


def telemetry_off() -> None:
    """Remove every OTEL_*/OTLP_* variable and FLEET_PROMETHEUS_PORT, for this process and its worker.

    Importing Fleet reads none of them; ``FleetClient()`` and the worker read them when they start.
    """
    for name in [n for n in os.environ if n.startswith(("OTEL_", "OTLP_"))]:
        del os.environ[name]
    os.environ.pop("FLEET_PROMETHEUS_PORT", None)


class PreviousClient(FleetClient):
    """``FleetClient`` as it was before telemetry: no setup call, no enqueue header."""

    def __init__(self, redis_url: str):  # the previous __init__, verbatim but for the setup call
        from celery import Celery

        from producer.celery_config import celery_config
        from producer.client import ModelCatalog

        settings = FleetSettings().model_copy(update={"redis_url": redis_url})
        self.settings = settings
        self.celery = Celery("fleet-producer", set_as_current=False)
        self.celery.conf.update(celery_config(settings))
        self._redis = redis.Redis.from_url(settings.redis_url)
        self.catalog = ModelCatalog(self._redis, settings.catalog_cache_s)

    def _submit(self, kind, request, priority):  # the previous _submit: send_task without headers=
        from producer.client import JobHandle

        queue = self.catalog.queue_for(kind, request.model)
        job_id = str(uuid.uuid4())
        record = {"kind": kind.value, "model": request.model, "queue": queue, "submitted_at": time.time(),
                  "stream": "0"}
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.job_record(job_id), mapping=record)
            pipe.expire(keys.job_record(job_id), self.settings.result_expires_s)
            pipe.execute()
        self.celery.send_task(TASK_FOR_KIND[kind], args=[request.model_dump(mode="json")], task_id=job_id,
                              queue=queue, priority=priority)
        return JobHandle(self, job_id, kind.value)


def start_worker(redis_url: str, name: str) -> LaunchedWorker:
    env = {"HF_HUB_OFFLINE": "1", "FLEET_TORCH_THREADS": "1", "FLEET_LOG_LEVEL": "WARNING", "FLEET_CONCURRENCY": "4"}
    return LaunchedWorker(redis_url, "--device", "cpu", "--models", "minilm", name=name, env=env,
                          log_path=Path(tempfile.gettempdir()) / f"{name}.log", cwd=REPO).wait_ready(300)


def round_trips(client: FleetClient, count: int) -> list[float]:
    samples = []
    for i in range(count):
        started = time.perf_counter()
        client.embed([f"telemetry overhead probe sentence number {i}"]).result(timeout=60)
        samples.append(time.perf_counter() - started)
    return samples


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return (f"median {1000 * statistics.median(ordered):7.2f} ms   p90 {1000 * p90:7.2f} ms   "
            f"mean {1000 * statistics.fmean(ordered):7.2f} ms   (n={len(ordered)})")


def per_call(label: str, statement, number: int = 200_000) -> str:
    seconds = min(timeit.repeat(statement, number=number, repeat=5)) / number
    return f"  {label:<58} {seconds * 1e9:8.0f} ns"


def micro() -> list[str]:
    from producer import telemetry as producer_telemetry
    from workers.observability import telemetry as worker_telemetry
    from workers.serving.batching import BatchInfo

    assert producer_telemetry.setup_producer() is False and not producer_telemetry.installed()
    lines = ["per call, telemetry off (min of 5 repeats):"]
    lines.append(per_call("producer: setup_producer() (each FleetClient())", producer_telemetry.setup_producer,
                          20_000))
    lines.append(per_call("producer: enqueue_headers() (each submit)", producer_telemetry.enqueue_headers))
    lines.append(per_call("worker: current_span() (each batcher submit)", worker_telemetry.current_span))
    batch_scope = worker_telemetry.BatchScope("cpu", {"minilm": "embed"})
    info = BatchInfo((0.0,), contexts=(None,))

    def scopes():
        with worker_telemetry.tokenize_span("minilm", "embed", 1) as span:
            worker_telemetry.record_tokens(span, [[1, 2, 3]])
        with batch_scope("minilm", info):
            with worker_telemetry.forward_span("minilm", "embed", "cpu", "float32", (1, 3)) as span:
                worker_telemetry.record_embedding_norms(span, None)

    lines.append(per_call("worker: tokenize + batch + forward scopes (each job)", scopes))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="round trips per variant (default 300)")
    parser.add_argument("--block", type=int, default=25, help="round trips per alternating block (default 25)")
    args = parser.parse_args()
    telemetry_off()

    from workers.process.embedded_redis import RedisServer

    server = RedisServer().start()
    worker = start_worker(server.url, f"bench-otel-{os.getpid()}")
    try:
        current, previous = FleetClient(server.url), PreviousClient(server.url)
        round_trips(current, 20)  # warm both paths, the worker and the catalog cache
        round_trips(previous, 20)
        samples: dict[str, list[float]] = {"previous": [], "current": []}
        clients = [("previous", previous), ("current", current)]
        while len(samples["current"]) < args.jobs:
            for label, client in clients:
                samples[label] += round_trips(client, args.block)
            clients.reverse()  # ABBA order: neither variant always runs first
        current.close()
        previous.close()
    finally:
        worker.stop()
        server.stop()

    import torch

    print(f"telemetry overhead, {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, torch {torch.__version__}, no OTLP endpoint")
    print("submit + result, one text, minilm on a CPU worker, alternating (ABBA) blocks of", args.block)
    print(f"  previous code path (no setup, no header): {summary(samples['previous'])}")
    print(f"  current, telemetry off:                   {summary(samples['current'])}")
    delta = statistics.median(samples["current"]) - statistics.median(samples["previous"])
    print(f"  difference of medians: {1000 * delta:+.2f} ms")
    print("\n".join(micro()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
