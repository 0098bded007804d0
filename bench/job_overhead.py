"""Per-job overhead of the queue path, with the model taken out of the picture.

    python -m bench.job_overhead --concurrency 4,16,128

Serves a tiny random BERT (1 layer, hidden 32: microseconds of compute) from one real
``fleet worker --device cpu`` on a private redis-server, submits ``--jobs`` single-text
embed jobs at once with ``embed_many`` and waits for all of them with ``gather``; prints
jobs/s per worker concurrency. What remains is Fleet's and Celery's own cost per job:
message delivery, the task trace, result writes, events, acks. Run it under ``py-spy
record -p <worker pid>`` to see where that cost goes (docs/BENCHMARKS.md has a profile).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.models import build_random_bert
from producer import FleetClient
from workers.process.embedded_redis import RedisServer
from workers.process.launch import LaunchedWorker

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_tiny_model(root: Path) -> Path:
    """A 1-layer, width-32 random BERT and a registry serving it as ``tiny``; returns the registry."""
    build_random_bert(root / "tiny", num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                      intermediate_size=64, vocab_size=2000)
    registry = root / "registry.toml"
    registry.write_text(f'[models.tiny]\nkind = "embed"\nsource = "dir:{root / "tiny"}"\n'
                        f'max_batch_size = 64\nmax_wait_ms = 2\nmax_seq_len = 64\n')
    return registry


def jobs_per_second(registry: Path, concurrency: int, jobs: int, workdir: Path) -> float:
    """Start a worker with ``concurrency`` task threads; time ``jobs`` jobs after one warm-up round."""
    server = RedisServer().start()
    env = {"FLEET_MODEL_REGISTRY": str(registry), "FLEET_TORCH_THREADS": "1", "FLEET_CONCURRENCY": str(concurrency)}
    worker = LaunchedWorker(server.url, "--device", "cpu", "--models", "tiny", name=f"overhead-{concurrency}",
                            env=env, log_path=workdir / f"worker-{concurrency}.log", cwd=REPO_ROOT)
    try:
        worker.wait_ready()
        with FleetClient(server.url) as client:
            client.gather(client.embed_many([["warm up"]] * jobs, model="tiny"), timeout=600)
            started = time.perf_counter()
            client.gather(client.embed_many([[f"ba bb bc {i}"] for i in range(jobs)], model="tiny"), timeout=600)
            return jobs / (time.perf_counter() - started)
    finally:
        worker.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--concurrency", default="4,16,128", help="comma-separated worker thread counts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleet-overhead-") as directory:
        workdir = Path(directory)
        registry = write_tiny_model(workdir)
        print(f"{'concurrency':>11} {'jobs/s':>8} {'ms/job':>7}")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            rate = jobs_per_second(registry, concurrency, args.jobs, workdir)
            print(f"{concurrency:>11} {rate:>8.0f} {1000 / rate:>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
