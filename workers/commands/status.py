"""``fleet status``: the fleet as Redis sees it: workers, devices, models, queue depths.

A queue whose model no live worker serves is flagged: its jobs wait until a worker for the
model starts (or loads it: ``fleet models load``), and clients refuse new ones
(``ModelUnavailableError``) unless told to wait. A versioned model shows its name's queue (jobs
for whichever version a worker holds as current, named in the ``current`` column) and each
``name@version`` queue (jobs pinned to that version).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from producer import keys
from producer.core.catalog import parse_catalog
from producer.queues import queue_depth
from producer.redis_connection import redis_client
from producer.settings import FleetSettings
from workers.process.health import read_heartbeats


def print_status() -> int:
    client = redis_client(FleetSettings())
    console = Console()
    beats = read_heartbeats(client)
    workers = Table(title="Workers")
    for column in ("name", "ready", "device", "models", "in flight", "last job"):
        workers.add_column(column)
    for beat in beats:
        last = beat.get("last_job_at")
        workers.add_row(beat["name"], "yes" if beat.get("ready") else "no",
                        f"{beat.get('device')} {beat.get('device_name', '')}",
                        ",".join(beat.get("models", [])), str(beat.get("in_flight", 0)),
                        f"{time.time() - last:.0f} s ago" if last else "-")
    queues = Table(title="Queues")
    for column in ("model", "queue", "waiting", "live workers", "current"):
        queues.add_column(column, justify="right" if column in ("waiting", "live workers") else "left")
    unserved = []
    for name, entry in sorted(parse_catalog(client.hgetall(keys.CATALOG)).items()):
        serving = sum(name in beat.get("models", []) for beat in beats)
        current = sorted({beat.get("current", {}).get(name) for beat in beats} - {None, name})
        depth = queue_depth(client, entry.queue)
        queues.add_row(name, entry.queue, str(depth), str(serving) if serving else "[bold red]none[/]",
                       ", ".join(current) or "-")
        if not serving:
            unserved.append((name, entry, depth))
    console.print(workers)
    console.print(queues)
    for name, entry, depth in unserved:
        seen = f"last served {time.time() - entry.last_seen:.0f} s ago" if entry.last_seen else "never served"
        console.print(f"[bold red]warning:[/] no live worker serves {name} ({seen}): {depth} job(s) wait in "
                      f"{entry.queue}; start `fleet worker --models {name}` or run `fleet models load {name}`")
    return 0
