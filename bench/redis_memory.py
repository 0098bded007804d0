"""Redis memory per finished job: what a day of results costs (docs/RELIABILITY.md, "Redis memory").

    .venv/bin/python -m bench.redis_memory [--jobs 1000] [--out bench/results/redis-memory.json]

On a private redis-server it starts one ``fleet worker --device cpu --models minilm`` (as a user
does) and, per case, submits ``--jobs`` embed jobs with ``FleetClient.submit_many``, waits for
every result, and reports Redis' ``used_memory`` growth per job (bytes), the keys each job left
behind (``DBSIZE`` growth per job) and, for one job of the case, ``MEMORY USAGE`` of each of its
keys. Cases: one sentence with float results (the default), one sentence with
``encoding="base64"``, and 32 sentences with float results. What stays is what the result TTL
(``FLEET_RESULT_EXPIRES_S``, default 86400 s, or a job's ``result_ttl_s``) keeps.

Prints one JSON document (``--out`` writes it too). No test asserts these figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import redis

from bench.job_cost import SENTENCE, print_report
from bench.private_fleet import worker_on_private_redis
from bench.provenance import commit
from producer import FleetClient
from producer.contract import EmbedRequest, ModelKind

#: name -> (texts per job, result encoding)
CASES = {"1 text, float results": (1, "float"), "1 text, base64 results": (1, "base64"),
         "32 texts, float results": (32, "float")}


def used_memory(client: redis.Redis) -> int:
    """Redis' ``used_memory`` in bytes, after a moment for lazy frees to settle."""
    time.sleep(0.5)
    return int(client.info("memory")["used_memory"])


def keys_of(client: redis.Redis, job_id: str) -> dict[str, int]:
    """Every key whose name holds ``job_id``, with its ``MEMORY USAGE`` in bytes."""
    return {key.decode(): int(client.memory_usage(key) or 0) for key in client.scan_iter(match=f"*{job_id}*")}


def measure(fleet: FleetClient, client: redis.Redis, texts: int, encoding: str, jobs: int) -> dict:
    requests = [EmbedRequest(texts=[f"{SENTENCE} [{job} {i}]" for i in range(texts)], model="minilm",
                             encoding=encoding) for job in range(jobs)]
    memory0, keys0 = used_memory(client), client.dbsize()
    handles = fleet.submit_many(ModelKind.EMBED, requests)
    fleet.gather(handles, timeout=900)
    memory1, keys1 = used_memory(client), client.dbsize()
    return {"jobs": jobs, "bytes_per_job": round((memory1 - memory0) / jobs),
            "keys_per_job": round((keys1 - keys0) / jobs, 2), "one_job_keys": keys_of(client, handles[0].id)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per case (default 1000)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    with worker_on_private_redis("--device", "cpu", "--models", "minilm", name="bench-redis-memory") as url:
        client = redis.Redis.from_url(url)
        report: dict = {"command": "python -m bench.redis_memory "
                        + " ".join(argv if argv is not None else sys.argv[1:]),
                        "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "redis_version": client.info("server")["redis_version"], "cases": {}}
        with FleetClient(url) as fleet:
            for name, (texts, encoding) in CASES.items():
                report["cases"][name] = measure(fleet, client, texts, encoding, args.jobs)
                print(name, json.dumps(report["cases"][name]), flush=True)
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
