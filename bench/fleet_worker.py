"""``fleet worker`` for the benchmark: the real worker, plus its batchers' statistics in Redis.

Runs exactly ``fleet worker ARGS`` (``workers.commands.cli.main``) and, once the worker is ready, a
thread that writes ``DynamicBatcher.stats_snapshot()`` of every resident model (and the
embedder's CUDA-graph report) as JSON to ``bench:fleet:batching`` every 0.2 s, so that the
benchmark can report the real mean batch size of each phase.

    python -m bench.fleet_worker --device cpu --models minilm --name bench-fleet
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time

STATS_KEY = "bench:fleet:batching"


def _publish_stats_forever() -> None:
    import redis

    from workers.serving import runtime as runtime_module

    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    while True:
        try:
            runtime = runtime_module.current()
            snapshot = {}
            for name, resident in runtime.models.items():
                if resident.batcher is None:
                    continue
                entry = resident.batcher.stats_snapshot()
                report = getattr(resident.impl, "graph_report", None)
                if report is not None:
                    entry["graphs"] = dataclasses.asdict(report)
                    entry["graphs"].pop("shapes", None)
                snapshot[name] = entry
            client.set(STATS_KEY, json.dumps(snapshot))
        except Exception:  # noqa: BLE001 - statistics must never disturb the worker
            pass
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    from celery import signals

    def start_reporter(**_: object) -> None:
        threading.Thread(target=_publish_stats_forever, name="bench-stats", daemon=True).start()

    signals.worker_ready.connect(start_reporter, weak=False)
    from workers.commands.cli import main as fleet_main

    return fleet_main(["worker", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
