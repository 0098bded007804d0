"""Training jobs through the queue: follow, resume after SIGKILL, cancel, train then serve."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from producer import FleetClient, JobCancelled, JobStatus
from tests.support.fleet_processes import WorkerProcess, fleet_executable
from workers.process.embedded_redis import RedisServer

pytestmark = pytest.mark.integration

#: Low enough that a SIGKILLed worker's job comes back within seconds (the production default is hours).
VISIBILITY_S = "6"


@pytest.fixture(scope="module")
def training_fleet(tmp_path_factory):
    """A private Redis and the environment for `fleet worker --train` processes sharing one artifact dir."""
    server = RedisServer().start()
    env = {"FLEET_ARTIFACT_DIR": str(tmp_path_factory.mktemp("artifacts")), "FLEET_VISIBILITY_TIMEOUT_S": VISIBILITY_S,
           "FLEET_TORCH_THREADS": "2"}
    yield server, env
    server.stop()


def start_trainer(server, env, name):
    return WorkerProcess(server.url, "--device", "cpu", "--train", name=name, env=env).wait_ready()


def digits_eval_split():
    from workers.training.data import load_digits_split

    split = load_digits_split(seed=0, eval_fraction=0.2, input_shape=(64,))
    return split.eval_x.tolist(), split.eval_y.tolist()


def test_follow_shows_progress_then_the_trained_model_answers_classify_jobs(training_fleet):
    server, env = training_fleet
    trainer = start_trainer(server, env, "test-trainer-follow")
    try:
        completed = subprocess.run([*fleet_executable(), "train", "mlp", "--dataset", "digits", "--follow",
                                    "--register-as", "digits-mlp"], env={**os.environ, "REDIS_URL": server.url,
                                                                        "COLUMNS": "200"},
                                   capture_output=True, text=True, timeout=600)
    finally:
        trainer.stop()
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "epoch" in completed.stdout and "done" in completed.stdout
    accuracy = float(re.search(r"accuracy\s*│\s*([0-9.]+)", completed.stdout).group(1))
    assert accuracy >= 0.97

    server_worker = WorkerProcess(server.url, "--device", "cpu", "--models", "digits-mlp", name="test-serve-mlp",
                                  env=env).wait_ready()
    try:
        inputs, labels = digits_eval_split()
        with FleetClient(server.url) as client:
            result = client.classify(inputs=inputs[:200], model="digits-mlp").result(timeout=60)
        predicted = [int(p[0].label) for p in result.predictions]
        served_accuracy = sum(p == y for p, y in zip(predicted, labels[:200])) / 200
        assert served_accuracy >= 0.95
    finally:
        server_worker.stop()


def test_sigkilled_training_resumes_from_its_checkpoint(training_fleet):
    server, env = training_fleet
    first = start_trainer(server, env, "test-trainer-1")
    with FleetClient(server.url) as client:
        handle = client.train("mlp", "digits", checkpoint_every_steps=25)
        deadline = time.monotonic() + 300
        while (handle.progress() is None or handle.progress().step < 120) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert handle.progress().step >= 120
        first.stop(signal.SIGKILL)
        second = start_trainer(server, env, "test-trainer-2")
        try:
            result = handle.result(timeout=600)
        finally:
            second.stop()
    assert result.resumed_from_step >= 100
    assert result.metrics["accuracy"] >= 0.97


def test_cancel_stops_training_at_the_next_step_and_keeps_a_checkpoint(training_fleet):
    server, env = training_fleet
    trainer = start_trainer(server, env, "test-trainer-cancel")
    try:
        with FleetClient(server.url) as client:
            handle = client.train("cnn", "digits", epochs=50)
            deadline = time.monotonic() + 300
            while handle.progress() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            step_at_cancel = handle.progress().step
            handle.cancel()
            with pytest.raises(JobCancelled):
                handle.result(timeout=60)
            assert handle.status() is JobStatus.CANCELLED
    finally:
        trainer.stop()
    checkpoints = list((__import__("pathlib").Path(env["FLEET_ARTIFACT_DIR"])).rglob(f"*{handle.id}*"))
    assert checkpoints, "a cancelled job keeps its checkpoint"
    assert "cancelled at step" in trainer.log()
    stopped_at = int(re.search(r"cancelled at step (\d+)", trainer.log()).group(1))
    assert stopped_at >= step_at_cancel
