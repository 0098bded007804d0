"""``fleet status``: the fleet as Redis sees it: workers, devices, models, queue depths."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from producer import keys
from producer.queues import queue_depth
from producer.redis_connection import redis_client, text
from producer.settings import FleetSettings
from workers.process.health import read_heartbeats


def print_status() -> int:
    client = redis_client(FleetSettings())
    console = Console()
    workers = Table(title="Workers")
    for column in ("name", "ready", "device", "models", "in flight", "last job"):
        workers.add_column(column)
    for beat in read_heartbeats(client):
        last = beat.get("last_job_at")
        workers.add_row(beat["name"], "yes" if beat.get("ready") else "no",
                        f"{beat.get('device')} {beat.get('device_name', '')}",
                        ",".join(beat.get("models", [])), str(beat.get("in_flight", 0)),
                        f"{time.time() - last:.0f} s ago" if last else "-")
    queues = Table(title="Queues")
    queues.add_column("model")
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    for name, raw in sorted(client.hgetall(keys.CATALOG).items()):
        entry = json.loads(raw)
        queues.add_row(text(name), entry["queue"], str(queue_depth(client, entry["queue"])))
    console.print(workers)
    console.print(queues)
    return 0
