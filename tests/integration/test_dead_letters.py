"""Poison jobs: retried a bounded number of times, then dead-lettered with the reason; `fleet dlq` manages them."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from producer import ErrorCode, FleetClient, JobFailedError
from tests.support.fleet_processes import WorkerProcess, fleet_executable
from workers.process.embedded_redis import RedisServer

pytestmark = pytest.mark.integration

SMALL_VOCAB = 200


def write_mismatched_encoder(directory):
    """A real model directory whose tokenizer knows words the model has no embedding row for.

    Texts made of the first words work; a word past ``SMALL_VOCAB`` makes the forward pass fail
    (index out of range): a poisoned input, as a corrupted or mismatched model upload produces.
    """
    from bench.models import build_random_bert, made_up_words

    tiny = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    build_random_bert(directory, vocab_size=SMALL_VOCAB, **tiny)
    build_random_bert(directory / "bigger", vocab_size=SMALL_VOCAB * 2, **tiny)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((directory / "bigger" / name).read_bytes())
    words = made_up_words(SMALL_VOCAB * 2 - 5)
    return words[:50], words[-1]


@pytest.fixture(scope="module")
def poisoned_fleet(tmp_path_factory):
    server = RedisServer().start()
    root = tmp_path_factory.mktemp("dlq")
    good_words, poison_word = write_mismatched_encoder(root / "mismatched")
    registry = root / "registry.toml"
    registry.write_text(f'[models.mismatched]\nkind = "embed"\nsource = "dir:{root / "mismatched"}"\n'
                        'max_wait_ms = 20\n')
    worker = WorkerProcess(server.url, "--device", "cpu", "--registry", str(registry), "--models", "mismatched",
                           name="test-dlq", env={"FLEET_MAX_ATTEMPTS": "3"}).wait_ready()
    yield server, worker, good_words, poison_word
    worker.stop()
    server.stop()


def fleet_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*fleet_executable(), *args], env={**os.environ, "REDIS_URL": url},
                          capture_output=True, text=True, timeout=60)


def test_poison_job_is_retried_then_dead_lettered_and_batch_mates_succeed(poisoned_fleet):
    server, worker, good_words, poison_word = poisoned_fleet
    with FleetClient(server.url) as client:
        poison = client.embed([f"{good_words[0]} {poison_word}"], model="mismatched")
        good = [client.embed([" ".join(good_words[i:i + 5])], model="mismatched") for i in range(5)]
        with pytest.raises(JobFailedError) as raised:
            poison.result(timeout=120)
        assert raised.value.code is ErrorCode.MODEL_ERROR
        assert raised.value.error.details == {"dead_lettered": True, "attempts": 3}
        assert all(h.result(timeout=60).dim == 32 for h in good)
        assert worker.alive()

        listed = fleet_cli(server.url, "dlq", "list")
        assert poison.id in listed.stdout and "attempts=3" in listed.stdout
        shown = json.loads(fleet_cli(server.url, "dlq", "show", poison.id).stdout)
        assert shown["queue"] == "fleet.embed.mismatched" and poison_word in shown["payload"]["texts"][0]
        assert "index" in shown["reason"].lower()

        retried = fleet_cli(server.url, "dlq", "retry", poison.id)
        assert retried.returncode == 0, retried.stderr
        with pytest.raises(JobFailedError):
            poison.result(timeout=120)  # same id: the handle sees the new attempt's outcome
        assert json.loads(fleet_cli(server.url, "dlq", "show", poison.id).stdout)["attempts"] == 3

        assert "purged 1" in fleet_cli(server.url, "dlq", "purge").stdout
        assert fleet_cli(server.url, "dlq", "list").stdout == ""
        assert fleet_cli(server.url, "dlq", "show", poison.id).returncode == 1
