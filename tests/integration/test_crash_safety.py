"""A worker SIGKILLed mid-job loses nothing: the job runs again elsewhere, one result is stored.

How the job comes back (kombu's Redis transport, docs/RELIABILITY.md): when a worker takes a
message it is recorded in Redis (hash ``unacked``, scored by delivery time in
``unacked_index``) and removed only by the ack, which Fleet sends after the result is stored
(``task_acks_late``). A SIGKILLed worker never acks, so the message stays there until some
worker's ``QoS.restore_visible`` sweep finds it older than the visibility timeout and pushes
it back to its queue. Every worker sweeps when its consumer starts (``on_poll_init``) and
then every ``unacked_restore_interval`` seconds. These tests use a 5 s visibility timeout
so that the killed job comes back in seconds, not after the production 12 h.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
import redis

from producer import FleetClient
from producer.contract import Limits
from producer.settings import FleetSettings
from tests.support.fleet_processes import WorkerProcess
from workers.process.embedded_redis import RedisServer

pytestmark = pytest.mark.integration

VISIBILITY_S = 5
ENV = {"FLEET_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S), "FLEET_CONCURRENCY": "4"}


@pytest.fixture()
def private_redis():
    server = RedisServer(appendonly=True).start()
    yield server
    server.stop()


def executions(worker: WorkerProcess, job_id: str) -> int:
    """How many times ``worker`` finished running ``job_id`` (its "Task ... succeeded" log lines)."""
    return len(re.findall(rf"Task fleet\.\w+\[{re.escape(job_id)}\] succeeded", worker.log()))


def result_keys(client: redis.Redis, job_id: str) -> list[bytes]:
    return list(client.scan_iter(match=f"celery-task-meta-{job_id}*"))


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def test_sigkilled_worker_job_completes_exactly_once_on_another_worker(private_redis, demo_registry):
    args = ("--device", "cpu", "--registry", str(demo_registry), "--models", "tiny-llama")
    settings = FleetSettings(redis_url=private_redis.url, visibility_timeout_s=VISIBILITY_S)
    raw = redis.Redis.from_url(private_redis.url)
    victim = WorkerProcess(private_redis.url, *args, name="crash-victim", env=ENV).wait_ready()
    rescuer = None
    try:
        with FleetClient(settings=settings) as client:
            handle = client.generate("A long story", model="tiny-llama", max_new_tokens=Limits.MAX_NEW_TOKENS,
                                     stream=True)
            next(handle.stream(timeout=60))  # the job is running on the victim now
            victim.stop(signal.SIGKILL)
            killed_at = time.monotonic()

            # Nothing was acknowledged: the message is held in Redis, not lost, not in the queue.
            assert raw.hexists("unacked", _delivery_tag(raw, handle.id)), "the killed job's message vanished"
            assert handle.status().value == "running"
            assert result_keys(raw, handle.id) == [f"celery-task-meta-{handle.id}".encode()]  # STARTED only
            assert json.loads(raw.get(f"celery-task-meta-{handle.id}"))["status"] == "STARTED"

            rescuer = WorkerProcess(private_redis.url, *args, name="crash-rescuer", env=ENV).wait_ready()
            result = handle.result(timeout=120)
            assert result.tokens_generated == Limits.MAX_NEW_TOKENS
            assert time.monotonic() - killed_at >= VISIBILITY_S  # it came back through the timeout

            # Exactly one stored result, SUCCESS; the message is acknowledged and gone.
            assert result_keys(raw, handle.id) == [f"celery-task-meta-{handle.id}".encode()]
            assert json.loads(raw.get(f"celery-task-meta-{handle.id}"))["status"] == "SUCCESS"
            assert wait_until(lambda: raw.hlen("unacked") == 0, 10)
            assert raw.llen("fleet.generate.tiny-llama") == 0
            # Computed once to the end: by the rescuer. The victim never finished it.
            assert executions(victim, handle.id) == 0
            assert executions(rescuer, handle.id) == 1
            attempts = raw.get(f"fleet:attempts:{handle.id}")
            if attempts is not None:  # the delivery counter of the dead-letter feature, where present
                assert int(attempts) == 2
    finally:
        if rescuer is not None:
            rescuer.stop()
        victim.stop()
        raw.close()


def test_sigkill_with_many_jobs_in_flight_loses_none_and_stores_one_result_each(private_redis):
    settings = FleetSettings(redis_url=private_redis.url, visibility_timeout_s=VISIBILITY_S)
    raw = redis.Redis.from_url(private_redis.url)
    args = ("--device", "cpu", "--models", "minilm")
    env = {**ENV, "FLEET_CONCURRENCY": "16"}
    victim = WorkerProcess(private_redis.url, *args, name="crash-many-victim", env=env).wait_ready()
    rescuer = None
    try:
        with FleetClient(settings=settings) as client:
            handles = [client.embed([f"in flight {i} " + "word " * 200]) for i in range(150)]
            wait_until(lambda: raw.hlen("unacked") >= 8, 30, 0.01)  # the victim holds a handful
            victim.stop(signal.SIGKILL)
            held = raw.hlen("unacked")
            rescuer = WorkerProcess(private_redis.url, *args, name="crash-many-rescuer", env=env).wait_ready()
            results = client.gather(handles, timeout=180)
            assert all(r.dim == 384 for r in results)
            for handle in handles:
                assert result_keys(raw, handle.id) == [f"celery-task-meta-{handle.id}".encode()]
            assert wait_until(lambda: raw.hlen("unacked") == 0, 10)
            computed = {h.id: executions(victim, h.id) + executions(rescuer, h.id) for h in handles}
            assert all(count >= 1 for count in computed.values())
            print(f"held by the victim when killed: {held}; computed twice: "
                  f"{sum(1 for c in computed.values() if c > 1)}")
    finally:
        if rescuer is not None:
            rescuer.stop()
        victim.stop()
        raw.close()


def _delivery_tag(client: redis.Redis, job_id: str) -> str:
    """The kombu delivery tag under which ``job_id``'s message is held in ``unacked``."""
    for tag, body in client.hgetall("unacked").items():
        message = json.loads(body)[0]
        if message.get("headers", {}).get("id") == job_id:
            return tag.decode()
    raise AssertionError(f"job {job_id} is not held in unacked")
