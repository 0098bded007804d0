"""`fleet up` with two CPU worker processes: all three kinds served, crashes restarted, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import redis

from producer import FleetClient
from producer.contract import EmbedRequest, ModelKind
from tests.support.fleet_processes import REPO_ROOT, TEST_WORKER_ENV, fleet_executable, wait_for
from workers.process.health import read_heartbeats

pytestmark = pytest.mark.integration


@pytest.fixture()
def redis_url(private_redis):
    """The test's own Redis (overriding the session's, which the conftest's ``redis_client`` and ``client``
    then use): no session worker may take the jobs that ``fleet up``'s workers must count."""
    return private_redis.url


@pytest.fixture()
def fleet_up(redis_url, demo_registry, tmp_path):
    process = start_fleet_up(redis_url, tmp_path / "up.log", "--devices", "cpu:2", "--registry", str(demo_registry),
                             "--models", "minilm,topics,tiny-llama")
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


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


def start_fleet_up(redis_url: str, log_path, *arguments: str) -> subprocess.Popen:
    """``fleet up ARGUMENTS`` as a user runs it, its output in ``log_path``."""
    return subprocess.Popen([*fleet_executable(), "up", *arguments],
                            env={**os.environ, **TEST_WORKER_ENV, "REDIS_URL": redis_url, "FLEET_CONCURRENCY": "8",
                                 "FLEET_HEARTBEAT_INTERVAL_S": "0.5", "FLEET_DRAIN_GRACE_S": "1"},
                            cwd=REPO_ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def test_sigterm_to_fleet_up_under_load_hands_jobs_back_and_a_new_fleet_up_finishes_them(private_redis, tmp_path):
    """Issue 18 item 3 on this machine's CPUs: two worker groups (one per "device") under load;
    SIGTERM to ``fleet up`` drains every worker, the unfinished jobs wait in Redis (nothing held,
    nothing failed), and a second ``fleet up`` gives each of them its one result."""
    redis_client = redis.Redis.from_url(private_redis.url)
    arguments = ("--devices", "cpu:2", "--models", "minilm")
    first = start_fleet_up(private_redis.url, tmp_path / "first.log", *arguments)
    try:
        wait_for(lambda: len(ready_workers(redis_client)) == 2, 240, "two ready workers")
        with FleetClient(private_redis.url) as fleet:
            handles = fleet.submit_many(ModelKind.EMBED, [EmbedRequest(texts=[f"drain under load, sentence {i}"])
                                                          for i in range(800)])
            wait_for(lambda: sum(b["jobs_done"] for b in ready_workers(redis_client)) >= 20, 60, "jobs being served")
            first.send_signal(signal.SIGTERM)
            assert first.wait(120) == 0
            unfinished = [handle for handle in handles if not handle.status().finished]
            assert unfinished, "every job finished before the SIGTERM took effect: no load to drain"
            assert redis_client.hlen("unacked") == 0, "a stopped worker still holds messages"
            assert not any(handle.status().value == "failed" for handle in handles)

            second = start_fleet_up(private_redis.url, tmp_path / "second.log", *arguments)
            try:
                results = fleet.gather(handles, timeout=300)
            finally:
                second.send_signal(signal.SIGTERM)
                second.wait(120)
        assert all(result.dim == 384 for result in results)
        assert {h.status().value for h in handles} == {"succeeded"}
        log = (tmp_path / "first.log").read_text()
        assert log.count("draining") >= 2, "each worker group drains"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
