"""Every message a worker cannot run is refused, answered and dead-lettered; none ends the worker.

Raw kombu messages go to the queue of the session's real ``fleet worker`` (tests/conftest.py). Each
case is one a user met (issue 19): the first seven ended the worker process (``Unrecoverable error``),
the next ones were dropped with a log line and no result.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import uuid

import pytest
import yaml

from producer.contract import ErrorCode, inference_queue
from tests.support.fleet_processes import fleet_executable, wait_for
from tests.support.raw_messages import GOOD_EMBED_BODY, RawSender, dead_letter, final_meta, task_headers
from workers.queue.wire_guard import UNNAMED_PREFIX

pytestmark = pytest.mark.integration

QUEUE = inference_queue("embed", "minilm")
REQUEST = {"texts": ["x"]}
JSON = "application/json"


def body(value) -> bytes:
    return json.dumps(value).encode()


#: case -> (body, content type, header overrides, words the refusal's problem must contain)
CASES = {
    # These ended the worker.
    "empty body": (b"", JSON, {}, "not [args, kwargs, embed]"),
    "a JSON object instead of the protocol-2 array": (body(REQUEST), JSON, {}, "an object"),
    "[[request]]": (body([[REQUEST]]), JSON, {}, "an array of 1"),
    "a JSON string": (body("hello"), JSON, {}, "a string"),
    "null": (b"null", JSON, {}, "null"),
    "a number": (b"42", JSON, {}, "a number"),
    # kombu sends a body given content type "" as application/data.
    "a good body with content type ''": (GOOD_EMBED_BODY, "", {}, "content type 'application/data'"),
    "a task header that is a list": (GOOD_EMBED_BODY, JSON, {"task": ["fleet.embed"]}, "task header is an array"),
    # These were dropped without a result.
    "a body that is not JSON": (b"texts=hello", JSON, {}, "not valid UTF-8 JSON"),
    "pickle": (pickle.dumps(([REQUEST], {}, None)), "application/x-python-serialize", {}, "Fleet reads JSON only"),
    "YAML": (yaml.safe_dump([[REQUEST], {}, None]).encode(), "application/x-yaml", {}, "Fleet reads JSON only"),
    "text/plain": (GOOD_EMBED_BODY, "text/plain", {}, "content type 'text/plain'"),
    "invalid UTF-8": (b'[[{"texts": ["\xff\xfe"]}], {}, null]', JSON, {}, "not valid UTF-8 JSON"),
    "100k-deep nesting": (b"[" * 100_000 + b"]" * 100_000, JSON, {}, "not valid UTF-8 JSON"),
    "kwargs given as a string": (body([[REQUEST], "texts", None]), JSON, {},
                                 "kwargs (the body's second item) is a string"),
    "a compression header the body does not match": (GOOD_EMBED_BODY, JSON, {"compression": "application/x-gzip"},
                                                     "cannot be decoded"),
    # Found while building the guard.
    "an unknown task": (GOOD_EMBED_BODY, JSON, {"task": "fleet.nope"}, "unknown task 'fleet.nope'"),
    "protocol 1 (no task header)": (body({"task": "fleet.embed", "args": [REQUEST], "kwargs": {}}), JSON,
                                    {"task": None}, "no task header"),
    "args that are not an array": (body([REQUEST, {}, None]), JSON, {}, "args (the body's first item) is an object"),
    "embed that overrides the job id": (body([[REQUEST], {}, {"id": "another-job"}]), JSON, {}, "embed holds 'id'"),
    "callbacks that are not signatures": (body([[REQUEST], {}, {"callbacks": [5]}]), JSON, {},
                                          "embed callbacks is an array"),
    "a keyword argument named self": (body([[REQUEST], {"self": 1}, None]), JSON, {}, "kwargs name self"),
}


@pytest.fixture(scope="module")
def sender(redis_url):
    raw = RawSender(redis_url)
    yield raw
    raw.close()


def publish(sender: RawSender, case: str, job_id: str | None) -> None:
    payload, content_type, overrides, _ = CASES[case]
    headers = {name: value for name, value in {**task_headers(job_id), **overrides}.items() if value is not None}
    if job_id is None:
        del headers["id"], headers["root_id"]
    sender.publish(QUEUE, payload, content_type=content_type, headers=headers)


@pytest.mark.parametrize("case", list(CASES))
def test_a_message_the_worker_cannot_run_is_answered_and_dead_lettered(case, sender, redis_client, embed_worker,
                                                                       client):
    job_id = str(uuid.uuid4())
    publish(sender, case, job_id)
    meta = final_meta(redis_client, job_id)
    assert meta is not None, f"no answer for {case!r}; worker alive: {embed_worker.alive()}"
    assert meta["status"] == "FAILURE"
    assert (meta["result"]["exc_type"], meta["result"]["exc_module"]) == ("JobFailedError", "producer.errors")
    code, message, details = meta["result"]["exc_message"]
    assert code == ErrorCode.INVALID_MESSAGE.value
    assert CASES[case][3] in message and details["problem"] == message
    entry = dead_letter(redis_client, job_id)
    assert entry is not None and entry["reason"] == f"invalid_message: {message}"
    assert entry["queue"] == QUEUE and entry["message"]["body_length"] == len(CASES[case][0])
    assert embed_worker.alive()
    assert client.embed(["the worker still serves"]).result(timeout=60).dim == 384


def fleet_dlq(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*fleet_executable(), "dlq", *args], env={**os.environ, "REDIS_URL": redis_url},
                          capture_output=True, text=True, timeout=120)


def test_a_message_without_a_job_id_is_dead_lettered_under_a_generated_id(sender, redis_url, redis_client,
                                                                          embed_worker):
    before = set(redis_client.hkeys("fleet:dlq"))
    publish(sender, "a JSON object instead of the protocol-2 array", job_id=None)
    new = wait_for(lambda: set(redis_client.hkeys("fleet:dlq")) - before, 30, "a dead-letter entry")
    assert len(new) == 1
    entry_id = new.pop().decode()
    assert entry_id.startswith(UNNAMED_PREFIX)
    entry = dead_letter(redis_client, entry_id)
    assert entry["reason"] == "invalid_message: no id header: the message names no job"
    assert entry["payload"] == REQUEST  # the request the sender meant: `fleet dlq retry` sends it, framed right
    assert fleet_dlq(redis_url, "retry", entry_id).returncode == 0
    meta = final_meta(redis_client, entry_id, timeout_s=60)
    assert meta["status"] == "SUCCESS" and meta["result"]["dim"] == 384
    assert embed_worker.alive()


def test_a_valid_raw_message_still_runs(sender, redis_client, embed_worker):
    job_id = str(uuid.uuid4())
    sender.publish(QUEUE, GOOD_EMBED_BODY, content_type=JSON, content_encoding="binary", headers=task_headers(job_id))
    meta = final_meta(redis_client, job_id, timeout_s=60)
    assert meta is not None and meta["status"] == "SUCCESS", meta
    assert meta["result"]["dim"] == 384 and dead_letter(redis_client, job_id) is None


#: Queue items that no kombu producer writes (a raw LPUSH): kombu's transport fails on them before any consumer.
NOT_ENVELOPES = {
    "not JSON": b"hello",  # ended the worker
    "a JSON array": b"[1, 2]",  # ended the worker
    "an object without properties": b'{"body": "x"}',  # a KeyError: the consumer reconnected, the item was lost
    "properties without a delivery tag": b'{"properties": {}, "headers": {}, "body": ""}',
}


@pytest.mark.parametrize("case", list(NOT_ENVELOPES))
def test_a_queue_item_that_is_not_a_message_is_dead_lettered_and_the_worker_serves_on(case, redis_url, redis_client,
                                                                                        embed_worker, client):
    before = set(redis_client.hkeys("fleet:dlq"))
    redis_client.lpush(QUEUE, NOT_ENVELOPES[case])
    new = wait_for(lambda: set(redis_client.hkeys("fleet:dlq")) - before, 30, "a dead-letter entry")
    entry = dead_letter(redis_client, new.pop().decode())
    assert entry["job_id"].startswith(UNNAMED_PREFIX)
    assert entry["reason"].startswith("invalid_message: the queue item is not a kombu message envelope")
    retried = fleet_dlq(redis_url, "retry", entry["job_id"])  # nothing to re-send: refused, the entry is kept
    assert retried.returncode == 1 and "no task, queue or request" in retried.stderr
    assert dead_letter(redis_client, entry["job_id"]) == entry
    assert embed_worker.alive()
    assert client.embed(["the worker still serves"]).result(timeout=60).dim == 384
    assert "Connection to broker lost" not in embed_worker.log()
