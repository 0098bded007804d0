"""`fleet up` with two CPU worker processes: all three kinds served, crashes restarted, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import redis

from tests.support.fleet_processes import REPO_ROOT, fleet_executable, wait_for
from workers.process.health import read_heartbeats

pytestmark = pytest.mark.integration


@pytest.fixture()
def fleet_up(redis_url, demo_registry, tmp_path):
    log = (tmp_path / "up.log").open("w")
    env = {**os.environ, "REDIS_URL": redis_url, "FLEET_TORCH_THREADS": "1", "FLEET_CONCURRENCY": "8",
           "HF_HUB_OFFLINE": "1", "FLEET_HEARTBEAT_INTERVAL_S": "0.5"}
    process = subprocess.Popen([*fleet_executable(), "up", "--devices", "cpu:2", "--registry", str(demo_registry),
                                "--models", "minilm,topics,tiny-llama"], env=env, cwd=REPO_ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


def ready_workers(client: redis.Redis) -> list[dict]:
    return [b for b in read_heartbeats(client) if b["name"].startswith("fleet-cpu") and b.get("ready")]


def test_fleet_up_serves_all_kinds_restarts_crashes_and_stops(fleet_up, redis_client, client):
    workers = wait_for(lambda: len(ready_workers(redis_client)) == 2 and ready_workers(redis_client), 240,
                       "two ready workers")
    assert {w["device"] for w in workers} == {"cpu"}

    handles = []
    for i in range(12):
        handles.append(client.embed([f"sentence number {i}"]))
        handles.append(client.classify([f"the band played song {i}"], model="topics"))
        handles.append(client.generate(f"Story {i}:", model="tiny-llama", max_new_tokens=48))
    results = [h.result(timeout=120) for h in handles]
    assert all(r.device == "cpu" for r in results)
    # Heartbeats carry the counts, written every 0.5 s: wait until they have caught up with the results.
    done = wait_for(lambda: (lambda d: d if len(d) == 2 and sum(d.values()) >= len(handles) else None)(
        {b["name"]: b["jobs_done"] for b in ready_workers(redis_client)}), 30, "heartbeats counting every job")
    assert all(count > 0 for count in done.values()), done

    victim = workers[0]
    os.kill(victim["pid"], signal.SIGKILL)
    restarted = wait_for(lambda: [b for b in ready_workers(redis_client)
                                  if b["name"] == victim["name"] and b["pid"] != victim["pid"]], 240,
                         "the killed worker to be restarted")
    assert restarted[0]["pid"] != victim["pid"]
    assert client.embed(["after the restart"]).result(timeout=60).dim == 384

    fleet_up.send_signal(signal.SIGTERM)
    assert fleet_up.wait(120) == 0
    wait_for(lambda: not ready_workers(redis_client), 30, "heartbeats to disappear")
