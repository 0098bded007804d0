"""The catalog follows live workers: a model whose workers stopped is refused at the client, flagged by
``fleet status``, and served again once a worker for it starts."""

from __future__ import annotations

import os
import subprocess

import pytest

from producer import FleetClient, ModelUnavailableError
from producer.settings import FleetSettings
from tests.support.fleet_processes import WorkerProcess, fleet_executable

pytestmark = pytest.mark.integration


def _status(url: str) -> str:
    done = subprocess.run([*fleet_executable(), "status"], env={**os.environ, "REDIS_URL": url, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_model_whose_workers_stopped_is_refused_flagged_and_served_again(private_redis):
    args = ("--device", "cpu", "--models", "minilm")
    first = WorkerProcess(private_redis.url, *args, name="catalog-first").wait_ready()
    # No cached view of the live workers: the refusal right after the stop is what is under test.
    with FleetClient(settings=FleetSettings(redis_url=private_redis.url, catalog_cache_s=0)) as client:
        try:
            assert client.embed(["served"]).result(timeout=120).dim == 384
            assert "warning" not in _status(private_redis.url)
        finally:
            assert first.stop() == 0
        with pytest.raises(ModelUnavailableError) as raised:
            client.embed(["nobody serves me"])
        assert raised.value.model == "minilm" and raised.value.last_seen is not None
        assert "a worker last served it" in str(raised.value)
        waiting = client.embed(["queued for the next worker"], wait_for_worker=True)
        status = _status(private_redis.url)
        assert "warning: no live worker serves minilm" in status and "1 job(s) wait in fleet.embed.minilm" in status
        second = WorkerProcess(private_redis.url, *args, name="catalog-second").wait_ready()
        try:
            assert waiting.result(timeout=120).dim == 384
            assert client.embed(["served again"]).result(timeout=120).dim == 384
        finally:
            second.stop()
