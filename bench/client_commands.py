"""Redis commands per job sent by the producer side alone (``FleetClient``), counted with MONITOR.

    python -m bench.client_commands [--jobs 200]

A private redis-server, and in place of a worker a stand-in on a connection of its own that
takes each message (BRPOP) and stores a result the way Celery's Redis backend does (SETEX +
PUBLISH), announcing its model in a heartbeat. MONITOR records every command with the
connection that sent it; the stand-in's and the monitor's own are left out, so what remains is
the client's. Lua script bodies run inside Redis on behalf of the client and count as its.

Two phases: one job at a time (``embed(...).result()``), and ``embed_many`` + ``gather``.
Works with any checkout's ``producer`` on ``PYTHONPATH`` (to compare before and after).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter

import redis

from producer import FleetClient
from workers.process.embedded_redis import RedisServer

MODEL = "bench-embed"
QUEUE = f"fleet.embed.{MODEL}"
LISTS = [QUEUE, *(f"{QUEUE}\x06\x16{step}" for step in (3, 6, 9))]
STAND_IN, MONITOR = "bench-stand-in", "bench-monitor"


class StandIn(threading.Thread):
    """Answers every job on ``QUEUE`` with a SUCCESS result, as a worker's result backend stores it."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.redis = redis.Redis.from_url(url, client_name=STAND_IN)
        self.stopped = threading.Event()
        self.redis.hset("fleet:catalog", MODEL, json.dumps({"kind": "embed", "queue": QUEUE}))
        self.start()

    def run(self) -> None:
        next_beat = 0.0
        while not self.stopped.is_set():
            if time.monotonic() >= next_beat:
                self.redis.set("fleet:heartbeat:bench", json.dumps({"models": [MODEL]}), px=5000)
                self.redis.sadd("fleet:workers", "bench")
                next_beat = time.monotonic() + 1
            popped = self.redis.brpop(LISTS, timeout=0.2)
            if popped is None:
                continue
            job_id = json.loads(popped[1])["headers"]["id"]
            meta = json.dumps({"status": "SUCCESS", "result": {"model": MODEL, "device": "cpu", "dim": 2,
                                                                "vectors": [[0.6, 0.8]]},
                               "traceback": None, "children": [], "date_done": None, "task_id": job_id})
            with self.redis.pipeline() as pipe:
                pipe.setex(f"celery-task-meta-{job_id}", 3600, meta)
                pipe.publish(f"celery-task-meta-{job_id}", meta)
                pipe.execute()


class Recorder(threading.Thread):
    """Every command Redis executes, as (client address, command name)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.commands: list[tuple[str, str]] = []
        self.redis = redis.Redis.from_url(url, client_name=MONITOR)
        self.ready = threading.Event()
        self.start()
        self.ready.wait(10)

    def run(self) -> None:
        try:
            with self.redis.monitor() as monitor:
                self.ready.set()
                for command in monitor.listen():
                    address = ("lua" if command["client_type"] == "lua"
                               else f"{command['client_address']}:{command['client_port']}")
                    self.commands.append((address, command["command"].split(" ")[0].strip('"').upper()))
        except redis.ConnectionError:
            pass  # the server stopped: the recording is over


def client_counts(recorder: Recorder, admin: redis.Redis, start: int) -> Counter:
    names = {entry["addr"]: entry.get("name", "") for entry in admin.client_list()}
    counts: Counter = Counter()
    for address, name in recorder.commands[start:]:
        if address != "lua" and names.get(address) in (STAND_IN, MONITOR, "bench-admin"):
            continue
        counts[name] += 1
    return counts


def report(title: str, counts: Counter, jobs: int) -> None:
    total = sum(counts.values())
    print(f"{title}: {total / jobs:.2f} commands per job")
    for name, count in counts.most_common():
        print(f"  {name:<14} {count / jobs:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    server = RedisServer().start()
    stand_in = StandIn(server.url)
    admin = redis.Redis.from_url(server.url, client_name="bench-admin")
    try:
        recorder = Recorder(server.url)
        with FleetClient(server.url) as client:
            client.embed(["warm up"], model=MODEL).result(timeout=30)  # connections, catalog, subscription
            time.sleep(0.5)
            start = len(recorder.commands)
            for n in range(args.jobs):
                client.embed([f"one at a time {n}"], model=MODEL).result(timeout=30)
            time.sleep(0.5)
            report("one job at a time (embed + result)", client_counts(recorder, admin, start), args.jobs)
            start = len(recorder.commands)
            client.gather(client.embed_many([[f"many {n}"] for n in range(args.jobs)], model=MODEL), timeout=60)
            time.sleep(0.5)
            report("many at once (embed_many + gather)", client_counts(recorder, admin, start), args.jobs)
    finally:
        stand_in.stopped.set()
        stand_in.join(5)
        server.stop()


if __name__ == "__main__":
    main()
