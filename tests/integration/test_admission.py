"""Deadlines, priorities, backpressure and idempotency against a real Redis and worker."""

from __future__ import annotations

import json
import time

import pytest

from producer import FleetClient, InvalidRequest, JobExpired, JobStatus, QueueFull
from producer.celery_config import PRIORITY_BULK, PRIORITY_INTERACTIVE
from producer.queues import queue_depth
from producer.settings import FleetSettings
from tests.support.fleet_processes import WorkerProcess
from workers.process.embedded_redis import RedisServer

pytestmark = pytest.mark.integration

QUEUE = "fleet.embed.minilm"


@pytest.fixture()
def idle_fleet():
    """A private Redis whose catalog lists minilm but where no worker runs until the test starts one
    (clients here pass ``wait_for_worker``: they submit before a worker starts)."""
    server = RedisServer().start()
    worker = WorkerProcess(server.url, "--device", "cpu", "--models", "minilm", name="test-admission-0").wait_ready()
    worker.stop()
    yield server
    server.stop()


def test_job_past_its_deadline_is_not_computed_and_ends_expired(idle_fleet):
    with FleetClient(settings=FleetSettings(redis_url=idle_fleet.url, wait_for_worker=True)) as client:
        doomed = client.embed(["too late"], deadline_s=0.5)
        timely = client.embed(["in time"], deadline_s=300)
        time.sleep(1.0)
        worker = WorkerProcess(idle_fleet.url, "--device", "cpu", "--models", "minilm",
                               name="test-deadline").wait_ready()
        try:
            with pytest.raises(JobExpired):
                doomed.result(timeout=60)
            assert doomed.status() is JobStatus.EXPIRED
            assert timely.result(timeout=60).dim == 384
        finally:
            worker.stop()
    assert f"Task fleet.embed[{doomed.id}] succeeded" not in worker.log()


def test_interactive_jobs_overtake_queued_bulk_jobs(idle_fleet):
    with FleetClient(settings=FleetSettings(redis_url=idle_fleet.url, wait_for_worker=True)) as client:
        bulk = [client.embed([f"bulk {i}"], priority=PRIORITY_BULK) for i in range(30)]
        urgent = client.embed(["urgent"], priority=PRIORITY_INTERACTIVE)
        worker = WorkerProcess(idle_fleet.url, "--device", "cpu", "--models", "minilm", name="test-priority",
                               env={"FLEET_CONCURRENCY": "1"}).wait_ready()
        try:
            client.gather(bulk + [urgent], timeout=120)
        finally:
            worker.stop()
        done_at = {h.id: json.loads(client._redis.get(f"celery-task-meta-{h.id}"))["date_done"]
                   for h in [*bulk, urgent]}
    finished_before_urgent = sum(done_at[h.id] < done_at[urgent.id] for h in bulk)
    assert finished_before_urgent <= 2, f"{finished_before_urgent} bulk jobs ran before the interactive one"


def test_full_queue_refuses_with_queue_full_then_waits_for_room(idle_fleet):
    settings = FleetSettings(redis_url=idle_fleet.url, max_queue_depth=5, wait_for_worker=True)
    with FleetClient(settings=settings) as client:
        for i in range(5):
            client.embed([f"fill {i}"])
        with pytest.raises(QueueFull) as raised:
            client.embed(["one too many"])
        assert raised.value.depth == 5 and raised.value.limit == 5 and raised.value.queue == QUEUE
        assert queue_depth(client._redis, QUEUE) == 5
        worker = WorkerProcess(idle_fleet.url, "--device", "cpu", "--models", "minilm",
                               name="test-backpressure").wait_ready()
        try:
            waited = client.embed(["waits for room"], block_s=60)
            assert waited.result(timeout=60).dim == 384
        finally:
            worker.stop()


def test_same_idempotency_key_returns_the_same_job_and_runs_once(idle_fleet):
    with FleetClient(settings=FleetSettings(redis_url=idle_fleet.url, wait_for_worker=True)) as client:
        first = client.embed(["pay once"], idempotency_key="order-42")
        again = client.embed(["pay once"], idempotency_key="order-42")
        other = client.embed(["pay once"], idempotency_key="order-43")
        assert again.id == first.id and other.id != first.id
        assert queue_depth(client._redis, QUEUE) == 2
        worker = WorkerProcess(idle_fleet.url, "--device", "cpu", "--models", "minilm",
                               name="test-idempotency").wait_ready()
        try:
            assert again.result(timeout=60).vectors == first.result(timeout=60).vectors
            other.result(timeout=60)
        finally:
            worker.stop()
    assert worker.log().count(f"Task fleet.embed[{first.id}] succeeded") == 1


@pytest.mark.parametrize("options", [{"priority": 10}, {"priority": -1}, {"deadline_s": 0}])
def test_bad_submission_options_are_refused(options, idle_fleet):
    with FleetClient(idle_fleet.url) as client:
        with pytest.raises(InvalidRequest):
            client.embed(["x"], **options)
        assert queue_depth(client._redis, QUEUE) == 0
