"""What telemetry costs when it is off (no OTLP endpoint): job latency and per-call overhead.

    .venv/bin/python -m bench.telemetry_overhead [--jobs 300] [--block 25]

1. End to end: sequential ``client.embed([text]).result()`` round trips against a real
   ``fleet worker --device cpu --models minilm`` on a private redis-server, alternating in
   blocks (ABBA order) between today's submit path (telemetry off: the ``fleet_enqueued_at`` header
   in every message) and the path before telemetry (the same client with ``enqueue_headers`` giving
   no header; ``setup_producer()`` runs once per client, outside the timed round trips).
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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from unittest import mock

from producer import FleetClient
from producer import telemetry as producer_telemetry
from workers.process.launch import LaunchedWorker

REPO = Path(__file__).resolve().parent.parent


def telemetry_off() -> None:
    """Remove every OTEL_*/OTLP_* variable and FLEET_PROMETHEUS_PORT, for this process and its worker.

    Importing Fleet reads none of them; ``FleetClient()`` and the worker read them when they start.
    """
    for name in [n for n in os.environ if n.startswith(("OTEL_", "OTLP_"))]:
        del os.environ[name]
    os.environ.pop("FLEET_PROMETHEUS_PORT", None)


@contextmanager
def previous_code_path() -> Iterator[None]:
    """The submit path before telemetry, while the block runs: messages carry no enqueue header."""
    with mock.patch.object(producer_telemetry, "enqueue_headers", dict):
        yield


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
        client = FleetClient(server.url)
        round_trips(client, 20)  # warm both paths, the worker and the catalog cache
        with previous_code_path():
            round_trips(client, 20)
        samples: dict[str, list[float]] = {"previous": [], "current": []}
        paths: list[tuple[str, Callable[[], AbstractContextManager[None]]]] = [
            ("previous", previous_code_path), ("current", nullcontext)]
        while len(samples["current"]) < args.jobs:
            for label, path in paths:
                with path():
                    samples[label] += round_trips(client, args.block)
            paths.reverse()  # ABBA order: neither variant always runs first
        client.close()
    finally:
        worker.stop()
        server.stop()

    import torch

    print(f"telemetry overhead, {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, torch {torch.__version__}, no OTLP endpoint")
    print("submit + result, one text, minilm on a CPU worker, alternating (ABBA) blocks of", args.block)
    print(f"  previous code path (no header):           {summary(samples['previous'])}")
    print(f"  current, telemetry off:                   {summary(samples['current'])}")
    delta = statistics.median(samples["current"]) - statistics.median(samples["previous"])
    print(f"  difference of medians: {1000 * delta:+.2f} ms")
    print("\n".join(micro()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
