"""Jobs lost in delivery are sent again (workers/queue/delivery_sweeper.py), against a real Redis.

A worker SIGKILLed right after Redis handed it a message (BRPOP) and before it recorded the
message as unacknowledged loses that message; these tests reproduce exactly that state by
popping the message themselves and throwing it away.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import redis
from celery import Celery

from producer import FleetClient, keys
from producer.celery_config import celery_config
from producer.settings import FleetSettings
from tests.support.fleet_processes import WorkerProcess
from workers.process.embedded_redis import RedisServer
from workers.queue.delivery_sweeper import UNACKED_HASH, DeliverySweeper, message_job_id, resend_from_record

pytestmark = pytest.mark.integration


def envelope(job_id: str) -> str:
    """A kombu Redis message as the transport stores it (only the parts the sweeper reads)."""
    return json.dumps({"body": "", "headers": {"id": job_id, "task": "fleet.embed"}, "properties": {}})


def pending(client: redis.Redis, job_id: str, queue: str, age_s: float) -> None:
    client.hset(keys.job_record(job_id), mapping={"queue": queue, "task": "fleet.embed", "priority": 3,
                                                 "expires": "", "request": json.dumps({"texts": ["x"]})})
    client.zadd(keys.PENDING, {job_id: time.time() - age_s})


@pytest.fixture()
def private_redis():
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url)
    yield server, client
    client.close()
    server.stop()


def test_only_a_job_missing_in_two_sweeps_is_sent_again(private_redis):
    _, client = private_redis
    queue = "fleet.embed.minilm"
    pending(client, "waiting", queue, age_s=300)
    client.lpush(f"{queue}\x06\x163", envelope("waiting"))           # still in its queue (priority 3 list)
    pending(client, "delivered", queue, age_s=300)
    client.hset(UNACKED_HASH, "tag-1", json.dumps([json.loads(envelope("delivered")), "", queue]))
    pending(client, "finished", queue, age_s=300)
    client.set("celery-task-meta-finished", json.dumps({"status": "REVOKED"}))  # ended without starting
    pending(client, "lost", queue, age_s=300)                           # in no list, not unacked
    pending(client, "young", queue, age_s=1)                            # lost too, but within the grace period

    sent = []
    sweeper = DeliverySweeper(client, lambda job_id, record: sent.append((job_id, record)), owner="test",
                              interval_s=1.0, grace_s=60.0)
    assert sweeper.sweep_once() == []  # first sighting: only remembered
    assert client.smembers(keys.MISSING_JOBS) == {b"lost"}
    assert client.zscore(keys.PENDING, "finished") is None  # settled entries leave the pending set
    assert sweeper.sweep_once() == []  # the lock: one sweep per interval, fleet-wide
    client.delete(keys.SWEEPER_LOCK)
    assert sweeper.sweep_once() == ["lost"]
    assert [(job_id, record["task"], record["queue"]) for job_id, record in sent] == [("lost", "fleet.embed", queue)]
    assert client.zscore(keys.PENDING, "lost") > time.time() - 5  # its clock restarts with the new message
    assert message_job_id(envelope("x")) == "x" and message_job_id(b"not json") is None


def test_a_job_sent_again_keeps_its_deadline_and_result_lifetime(private_redis):
    server, client = private_redis
    client.hset(keys.CATALOG, "minilm", json.dumps({"kind": "embed", "queue": "fleet.embed.minilm"}))
    with FleetClient(server.url) as fleet:
        handle = fleet.embed(["lost"], deadline_s=600, result_ttl_s=120, wait_for_worker=True)
    [raw] = [client.rpop(name) for name in client.keys("fleet.embed.minilm*") if client.llen(name)]
    record = {name.decode(): value.decode() for name, value in client.hgetall(keys.job_record(handle.id)).items()}
    app = Celery("resend-test", set_as_current=False)
    app.conf.update(celery_config(FleetSettings(redis_url=server.url)))
    resend_from_record(app, handle.id, record)
    app.close()
    [again] = [client.rpop(name) for name in client.keys("fleet.embed.minilm*") if client.llen(name)]
    first, second = json.loads(raw)["headers"], json.loads(again)["headers"]
    assert second["id"] == handle.id and second["fleet_result_ttl_s"] == first["fleet_result_ttl_s"] == 120
    assert second["expires"] == first["expires"]


def test_a_message_lost_on_its_way_to_a_worker_still_gets_its_result(private_redis):
    server, client = private_redis
    env = {"FLEET_SWEEP_INTERVAL_S": "1", "FLEET_SWEEP_GRACE_S": "2", "FLEET_CONCURRENCY": "4"}
    first = WorkerProcess(server.url, "--device", "cpu", "--models", "minilm", name="sweep-a", env=env).wait_ready()
    with FleetClient(server.url) as fleet:
        expected = fleet.embed(["a job that goes astray"]).result(timeout=120).vectors[0]
        assert first.stop() == 0  # nobody consumes now; the catalog stays

        handle = fleet.embed(["a job that goes astray"], wait_for_worker=True)
        lists = [name for name in client.keys("fleet.embed.minilm*") if client.llen(name)]
        [raw] = [client.rpop(name) for name in lists]  # what a BRPOP to a worker killed at once does
        assert message_job_id(raw) == handle.id and client.zscore(keys.PENDING, handle.id) is not None

        second = WorkerProcess(server.url, "--device", "cpu", "--models", "minilm", name="sweep-b", env=env)
        try:
            second.wait_ready()
            result = handle.result(timeout=120)
        finally:
            second.stop()
    got = result.vectors[0]
    norms = math.sqrt(sum(x * x for x in got) * sum(y * y for y in expected))
    cosine = sum(x * y for x, y in zip(got, expected)) / norms
    assert cosine >= 0.9999
    assert "was lost in delivery" in second.log()
    assert client.zscore(keys.PENDING, handle.id) is None  # started: off the pending set
    assert client.hget(keys.job_record(handle.id), "request") is None  # and its request copy dropped
