"""What a worker stores is strict JSON, bounded, free of worker internals, and never steals a model name.

Real workers against the session's private Redis: the session's embed worker, one training worker
(``fleet worker --train``, started with ``FLEET_DEBUG_ERRORS=1``) and one worker serving the MLP that
the training worker trained. Jobs go through a plain Celery app, as docs/PROTOCOL.md allows.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from producer.contract import TASK_CLASSIFY, TASK_EMBED, TASK_TRAIN, TRAINING_QUEUE, ErrorCode, inference_queue
from producer.contract.training import MAX_LOSS_CURVE_POINTS
from tests.conftest import unique_name
from tests.support.fleet_processes import WorkerProcess
from tests.support.raw_messages import final_meta

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trainer(redis_url, tmp_path_factory):
    """A training worker that keeps tracebacks (``FLEET_DEBUG_ERRORS=1``) and its artifact directory."""
    env = {"FLEET_ARTIFACT_DIR": str(tmp_path_factory.mktemp("artifacts")), "FLEET_DEBUG_ERRORS": "1"}
    worker = WorkerProcess(redis_url, "--device", "cpu", "--train", name=unique_name("test-trainer"),
                           env=env).wait_ready()
    yield worker, env
    worker.stop()


def refuse_constant(name: str):
    raise AssertionError(f"{name} stored: not JSON")


def run(raw_app, redis_client, task: str, request: dict, queue: str, timeout_s: float = 120) -> dict:
    """Send ``request`` as a plain Celery client would; return its final stored meta, read as strict JSON."""
    job = raw_app.send_task(task, args=[request], queue=queue)
    assert final_meta(redis_client, job.id, timeout_s) is not None, f"no final result for {task} {request}"
    return json.loads(redis_client.get(f"celery-task-meta-{job.id}"), parse_constant=refuse_constant)


def train(raw_app, redis_client, request: dict) -> dict:
    return run(raw_app, redis_client, TASK_TRAIN, {"kind": "mlp", "epochs": 1, **request}, TRAINING_QUEUE)


def error_of(meta: dict) -> tuple[str, str, dict]:
    assert meta["status"] == "FAILURE", meta
    return tuple(meta["result"]["exc_message"])


@pytest.fixture(scope="module")
def trained_mlp(trainer, raw_app, redis_url):
    """A digits MLP trained by the training worker, registered under a fresh name, and a worker serving it."""
    import redis

    name = unique_name("digits-mlp")
    meta = train(raw_app, redis.Redis.from_url(redis_url), {"register_as": name})
    assert meta["status"] == "SUCCESS", meta
    server = WorkerProcess(redis_url, "--device", "cpu", "--models", name, name=unique_name("test-serve-mlp"),
                           env=trainer[1]).wait_ready()
    yield name
    server.stop()


def test_failure_results_carry_a_worker_traceback_only_with_the_debug_setting(raw_app, redis_client, embed_worker,
                                                                               trainer):
    job = raw_app.send_task(TASK_EMBED, args=[{"texts": []}], queue=inference_queue("embed", "minilm"))
    assert final_meta(redis_client, job.id)["status"] == "FAILURE"
    raw = redis_client.get(f"celery-task-meta-{job.id}").decode()
    assert json.loads(raw)["traceback"] is None
    assert os.sep + "workers" + os.sep not in raw and ".py" not in raw and "Traceback" not in raw

    debug = train(raw_app, redis_client, {"epochs": 0})  # the training worker runs with FLEET_DEBUG_ERRORS=1
    assert error_of(debug)[0] == ErrorCode.INVALID_INPUT.value
    assert "Traceback (most recent call last)" in debug["traceback"]


def test_a_non_finite_model_output_fails_with_model_error_and_never_reaches_the_wire(trained_mlp, raw_app,
                                                                                       redis_client):
    queue = inference_queue("classify", trained_mlp)
    overflowing = run(raw_app, redis_client, TASK_CLASSIFY, {"inputs": [[1.0] * 64, [3e38] * 64],
                                                             "model": trained_mlp}, queue)
    code, message, details = error_of(overflowing)
    assert code == ErrorCode.MODEL_ERROR.value and "not a finite number" in message
    assert details == {"non_finite": "score", "inputs": [1]}
    fine = run(raw_app, redis_client, TASK_CLASSIFY, {"inputs": [[1.0] * 64], "model": trained_mlp}, queue)
    assert fine["status"] == "SUCCESS" and math.isfinite(fine["result"]["predictions"][0][0]["score"])


@pytest.mark.parametrize("taken", ["minilm", "trained"])
def test_register_as_refuses_a_name_the_registry_holds(taken, trained_mlp, raw_app, redis_client):
    name = trained_mlp if taken == "trained" else taken  # minilm: in the worker's registry file
    before = redis_client.hget("fleet:trained-models", name)
    code, message, details = error_of(train(raw_app, redis_client, {"register_as": name}))
    assert code == ErrorCode.MODEL_NAME_TAKEN.value and name in message and details["register_as"] == name
    assert redis_client.hget("fleet:trained-models", name) == before


def test_the_loss_curve_of_a_long_job_is_downsampled(trainer, raw_app, redis_client):
    meta = train(raw_app, redis_client, {"epochs": 45, "batch_size": 64})
    assert meta["status"] == "SUCCESS", meta
    steps, curve = meta["result"]["steps"], meta["result"]["loss_curve"]
    stride = math.ceil(steps / MAX_LOSS_CURVE_POINTS)
    assert steps > MAX_LOSS_CURVE_POINTS and stride == 2
    assert len(curve) == math.ceil(steps / stride) <= MAX_LOSS_CURVE_POINTS
    assert curve[-1] < 0.5 * curve[0]
