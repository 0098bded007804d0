"""The per-job cost of Fleet's path, counted the way the fast-path issue counts it.

    .venv/bin/python -m bench.job_cost --jobs 500                  # this machine, MiniLM on CPU
    .venv/bin/python -m bench.job_cost --jobs 500 --consumers 2
    .venv/bin/python -m bench.job_cost --soak-jobs 100000          # memory over many jobs

On a private redis-server it starts one ``fleet worker --device cpu --models minilm`` (as a
user does) and measures:

* **start**: seconds from the worker's process start to its first answered job (the job is
  submitted right after the process starts and waits in Redis until the worker consumes);
* **sequential**: ``--jobs`` single-sentence jobs through ``FleetClient.embed(...).result()``,
  one after the other: Redis commands per job from ``INFO commandstats`` (client and worker
  together, by command), redis-server CPU per job, the worker's CPU per job (device process and
  consumers summed) and the client's own CPU per job;
* **memory**: resident memory of every worker process after warm-up and after the jobs
  (``--soak-jobs`` more, submitted in pipelined bulk, sampled ten times along the way, to tell
  growth that levels off from growth that does not).

Prints one JSON document (``--out`` writes it too). No test asserts these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench.costs import ProcessTreeCPU, RedisMeter
from producer import FleetClient
from producer.contract import EmbedRequest, ModelKind
from workers.process.launch import LaunchedWorker

REPO = Path(__file__).resolve().parent.parent
SENTENCE = "A man is playing a guitar on stage while the crowd sings along."


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib(tree: ProcessTreeCPU) -> dict[str, float]:
    return {str(pid): round(size / 2**20, 1) for pid, size in tree.rss_bytes().items()}


def print_report(report: dict, out: str | None) -> None:
    """Print ``report`` as JSON, and write it to ``out`` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="sequential single-sentence jobs (default 500)")
    parser.add_argument("--soak-jobs", type=int, default=0, help="then this many more, in bulk, for memory")
    parser.add_argument("--consumers", type=int, default=None, help="fleet worker --consumers N")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--torch-threads", default="2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from workers.process.embedded_redis import RedisServer

    workdir = Path(tempfile.mkdtemp(prefix="fleet-cost-"))
    server = RedisServer().start()
    os.environ["FLEET_TORCH_THREADS"] = args.torch_threads
    worker_args = ["--device", "cpu", "--models", args.model]
    if args.consumers is not None:
        worker_args += ["--consumers", str(args.consumers)]
    # The catalog entry lets the client submit before the worker has published it (start figure).
    import redis as redis_py

    redis_py.Redis.from_url(server.url).hset("fleet:catalog", args.model,
                                             json.dumps({"kind": "embed", "queue": f"fleet.embed.{args.model}"}))
    report: dict = {"command": "python -m bench.job_cost " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # the worker runs without telemetry
    started = time.perf_counter()
    worker = LaunchedWorker(server.url, *worker_args, name="bench-cost", log_path=workdir / "worker.log", cwd=REPO,
                            env={"HF_HUB_OFFLINE": "1", "FLEET_LOG_LEVEL": "WARNING",
                                 "FLEET_HEARTBEAT_INTERVAL_S": "0.5"})
    tree = ProcessTreeCPU(worker.pid)
    meter = RedisMeter(server.url)
    try:
        with FleetClient(server.url) as client:
            first = client.embed([SENTENCE], model=args.model, wait_for_worker=True)  # before the worker is up
            first.result(timeout=300)
            report["start_to_first_job_s"] = round(time.perf_counter() - started, 3)
            for _ in range(20):  # warm-up
                client.embed([SENTENCE], model=args.model).result(timeout=60)
            time.sleep(1.0)
            report["rss_mib_after_warmup"] = _rss_mib(tree)
            before, worker0, client0, t0 = meter.snapshot(), tree.seconds(), _own_cpu_s(), time.perf_counter()
            for index in range(args.jobs):
                client.embed([f"{SENTENCE} ({index})"], model=args.model).result(timeout=60)
            elapsed = time.perf_counter() - t0
            after, worker1, client1 = meter.snapshot(), tree.seconds(), _own_cpu_s()
            report["sequential"] = {
                "jobs": args.jobs, "seconds": round(elapsed, 2), "jobs_per_s": round(args.jobs / elapsed, 1),
                **meter.per_job(before, after, args.jobs),
                "worker_cpu_ms_per_job": round(1000 * (worker1 - worker0) / args.jobs, 3),
                "client_cpu_ms_per_job": round(1000 * (client1 - client0) / args.jobs, 3)}
            report["rss_mib_after_jobs"] = _rss_mib(tree)
            if args.soak_jobs:
                done, chunk, every = 0, 500, max(500, args.soak_jobs // 10)
                next_sample = every
                report["rss_mib_during_soak"] = []
                while done < args.soak_jobs:
                    batch = [EmbedRequest(texts=[f"{SENTENCE} [{done + i}]"], model=args.model)
                             for i in range(min(chunk, args.soak_jobs - done))]
                    client.gather(client.submit_many(ModelKind.EMBED, batch), timeout=600)
                    done += len(batch)
                    if done >= next_sample or done == args.soak_jobs:
                        report["rss_mib_during_soak"].append({"jobs": done + args.jobs + 21, **_rss_mib(tree)})
                        next_sample += every
                report["rss_mib_after_soak"] = report["rss_mib_during_soak"][-1]
    finally:
        meter.close()
        worker.stop(timeout_s=120)
        server.stop()
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
