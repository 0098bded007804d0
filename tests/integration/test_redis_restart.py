"""Redis restarts: with the append-only file on, a job whose submission returned survives a
clean (SIGTERM) or hard (SIGKILL) restart of Redis; a running worker reconnects by itself and
keeps serving; a producer rides out a short outage and fails within a bound on a long one.

What is and is not promised is in docs/RELIABILITY.md ("Redis restarts").
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Queue

from producer import FleetClient, FleetConnectionError, JobTimeoutError, keys
from producer.settings import FleetSettings
from tests.support.client_adapters import BlockingAsyncClient
from tests.support.fleet_processes import WorkerProcess
from workers.process.embedded_redis import RedisServer

pytestmark = pytest.mark.integration

QUEUE = "fleet.embed.minilm"
VISIBILITY_S = 5
ENV = {"FLEET_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S), "FLEET_CONCURRENCY": "16"}


class RestartableRedis:
    """A private redis-server with AOF (appendfsync everysec) that keeps its port and data dir."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.server = RedisServer(appendonly=True, directory=directory).start()
        self.port = self.server.port
        self.url = self.server.url

    def restart(self, sig: int = signal.SIGTERM, down_s: float = 0.5) -> float:
        """Stop Redis with ``sig``, stay down ``down_s`` seconds, start it again; return downtime."""
        started = time.monotonic()
        process = self.server.process
        process.send_signal(sig)
        process.wait(30)
        time.sleep(down_s)
        self.start_again()
        return time.monotonic() - started

    def start_again(self) -> None:
        """Start redis-server again on the same port and data directory (after it was stopped)."""
        self.server = RedisServer(self.port, appendonly=True, directory=self.directory).start()

    def start_again_in(self, delay_s: float) -> threading.Timer:
        """``start_again`` after ``delay_s`` seconds, on a timer thread (join it before checking)."""
        timer = threading.Timer(delay_s, self.start_again)
        timer.start()
        return timer

    def stop(self) -> None:
        self.server.stop(kill=True)


@pytest.fixture()
def aof_redis(tmp_path):
    server = RestartableRedis(tmp_path / "redis")
    yield server
    server.stop()


def _publish_catalog(url: str) -> None:
    """What a minilm worker writes, so that clients (with ``wait_for_worker``) accept jobs while none runs."""
    client = redis.Redis.from_url(url)
    client.hset(keys.CATALOG, "minilm", json.dumps({"kind": "embed", "queue": QUEUE}))
    client.close()


def _results(client: redis.Redis, job_ids: list[str]) -> dict[str, str | None]:
    raw = client.mget([f"celery-task-meta-{job}" for job in job_ids])
    return {job: (json.loads(value)["status"] if value else None) for job, value in zip(job_ids, raw)}


def _queued(client: redis.Redis) -> int:
    return sum(client.llen(name) for name in client.scan_iter(match=f"{QUEUE}*") if client.type(name) == b"list")


# --- the kombu fix, deterministically ---------------------------------------------------

def test_detached_channel_close_keeps_messages_and_late_ack_still_works(aof_redis):
    """The state Celery leaves behind after losing the broker mid-job (see workers/queue/redis_patches.py)."""
    from workers.queue import redis_patches

    redis_patches.install()
    connection = Connection(aof_redis.url, transport_options={"visibility_timeout": VISIBILITY_S})
    queue = Queue("patch-test", Exchange("patch-test", type="direct"), routing_key="patch-test")
    with connection.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key="patch-test", declare=[queue])
    delivered = []
    consumer = connection.Consumer([queue], callbacks=[lambda body, message: delivered.append(message)],
                                   accept=["json"])
    consumer.consume()
    connection.drain_events(timeout=5)
    assert len(delivered) == 1
    channel = connection.default_channel
    client = redis.Redis.from_url(aof_redis.url)
    try:
        connection.transport.client = None  # what Connection.collect() leaves after a lost connection
        channel.close()  # unpatched kombu 5.7.0: AttributeError 'NoneType' object has no attribute 'hostname'
        assert client.hlen("unacked") == 1 and client.llen("patch-test") == 0  # held, not restored twice
        delivered[0].ack()  # the job finished after the reconnect: its ack must still land
        assert client.hlen("unacked") == 0 and client.llen("patch-test") == 0
    finally:
        client.close()


def test_result_store_rides_out_a_short_outage(aof_redis):
    """Fix C in workers/queue/redis_patches.py: a finished job's result is stored once Redis is back."""
    from celery import Celery

    from workers.queue.app import worker_config  # installs the patches
    from workers.settings import WorkerSettings

    app = Celery("store-test", set_as_current=False)
    app.conf.update(worker_config(WorkerSettings(redis_url=aof_redis.url)))
    backend = app.backend
    backend.client.ping()
    aof_redis.server.process.kill()
    aof_redis.server.process.wait(30)
    restarter = aof_redis.start_again_in(2.0)
    started = time.monotonic()
    try:
        backend.store_result("store-test-job", {"answer": 42}, "SUCCESS")
    finally:
        restarter.join()
    assert time.monotonic() - started >= 1.5
    assert backend.get_task_meta("store-test-job")["result"] == {"answer": 42}
    app.close()


# --- jobs queued with no worker ---------------------------------------------------------

def test_queued_jobs_survive_clean_and_hard_redis_restarts(aof_redis):
    _publish_catalog(aof_redis.url)
    raw = redis.Redis.from_url(aof_redis.url)
    with FleetClient(settings=FleetSettings(redis_url=aof_redis.url, visibility_timeout_s=VISIBILITY_S,
                                            wait_for_worker=True)) as client:
        before_clean = [client.embed([f"queued before a clean restart {i}"]) for i in range(30)]
        time.sleep(1.5)  # > appendfsync everysec
        aof_redis.restart(signal.SIGTERM)
        assert _queued(raw) == 30, "a clean restart must keep every queued job"
        assert all(raw.exists(keys.job_record(h.id)) for h in before_clean)

        before_crash = [client.embed([f"queued before a crash {i}"]) for i in range(30)]
        time.sleep(1.5)
        aof_redis.restart(signal.SIGKILL)
        assert _queued(raw) == 60, "a crash must keep every job submitted more than 1 s earlier"

        worker = WorkerProcess(aof_redis.url, "--device", "cpu", "--models", "minilm", name="restart-queued",
                               env=ENV)
        try:
            worker.wait_ready()
            results = client.gather(before_clean + before_crash, timeout=120)
            assert all(result.dim == 384 for result in results)
        finally:
            worker.stop()
    raw.close()


# --- a running worker -------------------------------------------------------------------

def test_running_worker_survives_redis_restarts_mid_load(aof_redis):
    raw = redis.Redis.from_url(aof_redis.url)
    worker = WorkerProcess(aof_redis.url, "--device", "cpu", "--models", "minilm", name="restart-busy", env=ENV)
    worker.wait_ready()
    submitted: list = []
    try:
        with FleetClient(settings=FleetSettings(redis_url=aof_redis.url, visibility_timeout_s=VISIBILITY_S)) as client:
            for round_, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
                batch = [client.embed([f"round {round_} job {i} " + "word " * 100]) for i in range(150)]
                submitted += batch
                waiter = _ResultWaiter(batch[-1])  # a caller blocked in result() across the restart
                time.sleep(0.3)  # the worker is busy with the batch now
                assert raw.hlen("unacked") > 0, "the restart should hit jobs in flight"
                aof_redis.restart(sig)
                after = [client.embed([f"after restart {round_} job {i}"]) for i in range(20)]
                submitted += after
                assert all(r.dim == 384 for r in client.gather(after, timeout=60)), "new jobs must be served"
                waiter.join(90)
                assert waiter.outcome == 384, waiter.outcome
                assert worker.alive(), worker.log()[-3000:]
            results = client.gather(submitted, timeout=120)
            assert all(result.dim == 384 for result in results)
            statuses = _results(raw, [h.id for h in submitted])
            assert set(statuses.values()) == {"SUCCESS"}
            deadline = time.monotonic() + 30
            while raw.hlen("unacked") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert raw.hlen("unacked") == 0 and _queued(raw) == 0
        log = worker.log()
        assert "Unrecoverable error" not in log
        assert log.count("Connected to ") >= 3  # the first connection and one per restart
        runs = re.findall(r"Task fleet\.embed\[([0-9a-f-]+)\] succeeded", log)
        twice = len(runs) - len(set(runs))
        print(f"jobs: {len(submitted)}; computed more than once (acks lost in the outage): {twice}")
    finally:
        worker.stop()
        raw.close()


class _ResultWaiter(threading.Thread):
    def __init__(self, handle):
        super().__init__(daemon=True)
        self.handle = handle
        self.outcome = None
        self.start()

    def run(self) -> None:
        try:
            self.outcome = self.handle.result(timeout=80).dim
        except Exception as exc:  # noqa: BLE001 - reported by the assertion
            self.outcome = f"{type(exc).__name__}: {exc}"


# --- the producer during an outage --------------------------------------------------------

def test_submission_rides_out_a_short_outage(aof_redis):
    _publish_catalog(aof_redis.url)
    with FleetClient(settings=FleetSettings(redis_url=aof_redis.url, visibility_timeout_s=VISIBILITY_S,
                                            wait_for_worker=True)) as client:
        client.models()  # cached: the outage starts at the job record write
        aof_redis.server.process.send_signal(signal.SIGTERM)
        aof_redis.server.process.wait(30)
        restarter = aof_redis.start_again_in(3.0)
        started = time.monotonic()
        try:
            handle = client.embed(["submitted while Redis was down"])
        finally:
            restarter.join()  # the fixture then stops the restarted server, whatever happened
        waited = time.monotonic() - started
        assert waited >= 2.5, "the submission should have waited for Redis"
        raw = redis.Redis.from_url(aof_redis.url)
        assert _queued(raw) == 1 and raw.exists(keys.job_record(handle.id))
        raw.close()


def test_submission_fails_within_a_bound_when_redis_stays_down(aof_redis):
    _publish_catalog(aof_redis.url)
    with FleetClient(settings=FleetSettings(redis_url=aof_redis.url, wait_for_worker=True)) as client:
        client.models()
        aof_redis.server.process.kill()
        aof_redis.server.process.wait(30)
        started = time.monotonic()
        with pytest.raises(FleetConnectionError) as raised:
            client.embed(["nobody will take this"])
        elapsed = time.monotonic() - started
        assert elapsed < 45, f"a submission must fail within a bound, took {elapsed:.1f} s"
        assert raised.value.url == aof_redis.url and "cannot be reached" in str(raised.value)
        # Start it again so the fixture's teardown finds a server to stop.
        aof_redis.server = RedisServer(aof_redis.port, appendonly=True, directory=aof_redis.directory).start()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_waits_end_with_job_timeout_when_redis_goes_away(flavour, aof_redis):
    _publish_catalog(aof_redis.url)
    raw = redis.Redis.from_url(aof_redis.url)
    raw.hset(keys.CATALOG, "tiny-llama", json.dumps({"kind": "generate", "queue": "fleet.generate.tiny-llama"}))
    raw.close()
    settings = FleetSettings(redis_url=aof_redis.url, wait_for_worker=True)
    client = FleetClient(settings=settings) if flavour == "sync" else BlockingAsyncClient(settings)
    try:
        queued = client.embed(["nobody computes this"])
        streaming = client.generate("Once", model="tiny-llama", stream=True)
        client.gather([queued], timeout=0.1, return_exceptions=True)  # the result subscription is up
        aof_redis.server.process.kill()
        aof_redis.server.process.wait(30)
        with pytest.raises(JobTimeoutError):
            queued.result(timeout=3)
        [(_, outcome)] = list(client.as_completed([queued], timeout=3))
        assert isinstance(outcome, JobTimeoutError)
        with pytest.raises(JobTimeoutError):
            list(streaming.stream(timeout=3))
    finally:
        client.close()
        aof_redis.server = RedisServer(aof_redis.port, appendonly=True, directory=aof_redis.directory).start()


def test_redis_server_supports_what_these_tests_need():
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    major, minor = map(int, re.search(r"v=(\d+)\.(\d+)", version).groups())
    assert (major, minor) >= (6, 2), version
