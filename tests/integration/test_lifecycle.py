"""Worker life cycle: refuses to start half-ready, SIGTERM while loading or draining loses no job."""

from __future__ import annotations

import signal
import time

import pytest

from producer import FleetClient
from producer.contract import Limits
from tests.support.fleet_processes import WorkerProcess, fleet_executable
from workers.commands.exit_codes import ExitCode

pytestmark = pytest.mark.integration


def test_model_that_fails_to_load_stops_the_worker_with_a_reason(redis_url, tmp_path):
    registry = tmp_path / "registry.toml"
    registry.write_text('[models.broken]\nkind = "embed"\nsource = "dir:no-such-directory"\n')
    worker = WorkerProcess(redis_url, "--device", "cpu", "--registry", str(registry), "--models", "broken",
                           name="test-broken")
    code = worker.process.wait(120)
    worker.stop()
    assert code == ExitCode.MODEL_LOAD_FAILED
    assert "loading models failed" in worker.log() and "no-such-directory" in worker.log()


def test_unknown_model_name_stops_the_worker(redis_url):
    worker = WorkerProcess(redis_url, "--device", "cpu", "--models", "ghost", name="test-ghost")
    assert worker.process.wait(60) == ExitCode.CONFIG
    worker.stop()
    assert "not in the registry: ghost" in worker.log()


def test_sigterm_while_loading_loses_no_job(private_redis):
    with FleetClient(private_redis.url) as client:
        first = WorkerProcess(private_redis.url, "--device", "cpu", "--models", "minilm", name="test-load-1")
        first.wait_ready()
        first.stop()  # the catalog now lists minilm; no worker is running
        handles = [client.embed([f"queued while no worker runs {i}"], wait_for_worker=True) for i in range(5)]
        loading = WorkerProcess(private_redis.url, "--device", "cpu", "--models", "minilm", name="test-load-2")
        deadline = time.monotonic() + 120
        while "loading 1 model(s)" not in loading.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loading.stop(signal.SIGTERM) == 0
        assert "Connected to redis" not in loading.log()
        survivor = WorkerProcess(private_redis.url, "--device", "cpu", "--models", "minilm", name="test-load-3")
        try:
            survivor.wait_ready()
            assert all(h.result(timeout=120).dim == 384 for h in handles)
        finally:
            survivor.stop()


def test_drain_hands_back_a_job_that_outlasts_the_grace_period(private_redis, demo_registry):
    paced = demo_registry.parent / "paced-registry.toml"  # 512 tokens take ~10 s: still running at SIGTERM
    paced.write_text(demo_registry.read_text().replace(
        "[models.tiny-llama]", '[models.tiny-llama]\nimpl = "tests.support.paced_generator:paced_generator"'))
    args = ("--device", "cpu", "--registry", str(paced), "--models", "tiny-llama")
    with FleetClient(private_redis.url) as client:
        draining = WorkerProcess(private_redis.url, *args, name="test-drain-1",
                                 env={"FLEET_DRAIN_GRACE_S": "0.3"}).wait_ready()
        handle = client.generate("A long story", model="tiny-llama", max_new_tokens=Limits.MAX_NEW_TOKENS,
                                 stream=True)
        next(handle.stream(timeout=60))  # running now
        assert draining.stop(signal.SIGTERM) == 0
        assert "handing them back" in draining.log()
        assert handle.status().value in ("running", "queued")
        finisher = WorkerProcess(private_redis.url, *args, name="test-drain-2").wait_ready()
        try:
            result = handle.result(timeout=120)
            assert result.tokens_generated == Limits.MAX_NEW_TOKENS
        finally:
            finisher.stop()


def test_drain_finishes_short_jobs_before_exiting(private_redis, demo_registry):
    args = ("--device", "cpu", "--registry", str(demo_registry), "--models", "tiny-llama")
    with FleetClient(private_redis.url) as client:
        worker = WorkerProcess(private_redis.url, *args, name="test-drain-3",
                               env={"FLEET_DRAIN_GRACE_S": "60"}).wait_ready()
        handle = client.generate("A short one", model="tiny-llama", max_new_tokens=200, stream=True)
        next(handle.stream(timeout=60))
        assert worker.stop(signal.SIGTERM) == 0
        assert handle.result(timeout=5).tokens_generated == 200
        assert "handing them back" not in worker.log()


def test_fleet_health_exit_codes(redis_url, embed_worker):
    import os
    import subprocess

    env = {**os.environ, "REDIS_URL": redis_url}
    ok = subprocess.run([*fleet_executable(), "health", "--worker", embed_worker.name], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("ok"), ok.stdout + ok.stderr
    live = subprocess.run([*fleet_executable(), "health", "--live", "--worker", embed_worker.name], env=env,
                          capture_output=True, text=True, timeout=60)
    assert live.returncode == 0 and "alive (ready)" in live.stdout
    missing = subprocess.run([*fleet_executable(), "health", "--worker", "nobody"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no heartbeat" in missing.stdout
    down = subprocess.run([*fleet_executable(), "health"], env={**env, "REDIS_URL": "redis://127.0.0.1:1/0"},
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == ExitCode.REDIS_UNAVAILABLE
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in down.stderr
