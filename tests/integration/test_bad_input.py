"""Bad input gets a clear, typed error and loses nothing: at the client and on the wire."""

from __future__ import annotations

import json

import pytest

from producer import ErrorCode, InvalidRequest, JobFailedError, UnknownModel
from producer.contract import TASK_EMBED, Limits, inference_queue
from producer.queues import queue_depth

pytestmark = pytest.mark.integration

QUEUE = inference_queue("embed", "minilm")

CLIENT_CASES = {
    "empty list": ([], InvalidRequest),
    "too many texts": (["x"] * (Limits.MAX_TEXTS_PER_JOB + 1), InvalidRequest),
    "non-string": (["fine", 42], InvalidRequest),
    "text over the limit": (["x" * (Limits.MAX_CHARS_PER_TEXT + 1)], InvalidRequest),
    "empty string": ([""], InvalidRequest),
    "single string instead of list": ("just one string", InvalidRequest),
}


@pytest.mark.parametrize("case", sorted(CLIENT_CASES))
def test_client_refuses_before_enqueue(case, client, redis_client, embed_worker):
    texts, error = CLIENT_CASES[case]
    keys_before = set(redis_client.keys("fleet:job:*"))
    with pytest.raises(error) as raised:
        client.embed(texts)
    assert raised.value.code is ErrorCode.INVALID_INPUT
    assert str(raised.value)
    assert set(redis_client.keys("fleet:job:*")) == keys_before
    assert queue_depth(redis_client, QUEUE) == 0


def test_client_refuses_unknown_model(client, redis_client, embed_worker):
    keys_before = set(redis_client.keys("fleet:job:*"))
    with pytest.raises(UnknownModel, match="no-such-model") as raised:
        client.embed(["hello"], model="no-such-model")
    assert raised.value.code is ErrorCode.UNKNOWN_MODEL
    assert set(redis_client.keys("fleet:job:*")) == keys_before


def test_client_refuses_malformed_model_name(client):
    with pytest.raises(InvalidRequest, match="model"):
        client.embed(["hello"], model="../../etc/passwd")


WIRE_CASES = {
    "empty list": ([{"texts": []}], {}, ErrorCode.INVALID_INPUT),
    "too many texts": ([{"texts": ["x"] * (Limits.MAX_TEXTS_PER_JOB + 1)}], {}, ErrorCode.INVALID_INPUT),
    "non-string": ([{"texts": ["ok", 3]}], {}, ErrorCode.INVALID_INPUT),
    "text over the limit": ([{"texts": ["y" * (Limits.MAX_CHARS_PER_TEXT + 1)]}], {}, ErrorCode.INVALID_INPUT),
    "missing field": ([{"model": "minilm"}], {}, ErrorCode.INVALID_INPUT),
    "unknown field": ([{"texts": ["a"], "evil": True}], {}, ErrorCode.INVALID_INPUT),
    "unknown model": ([{"texts": ["a"], "model": "ghost"}], {}, ErrorCode.UNKNOWN_MODEL),
    "no arguments": ([], {}, ErrorCode.INVALID_INPUT),
    "keyword arguments": ([], {"texts": ["a"]}, ErrorCode.INVALID_INPUT),
    "not an object": (["texts"], {}, ErrorCode.INVALID_INPUT),
    "future protocol": ([{"v": 99, "texts": ["a"]}], {}, ErrorCode.UNSUPPORTED_PROTOCOL),
    "version as a string": ([{"v": "1", "texts": ["a"]}], {}, ErrorCode.INVALID_INPUT),
}


@pytest.mark.parametrize("case", sorted(WIRE_CASES))
def test_worker_fails_bad_payload_with_code_and_keeps_serving(case, raw_app, client, embed_worker):
    args, kwargs, code = WIRE_CASES[case]
    async_result = raw_app.send_task(TASK_EMBED, args=args, kwargs=kwargs, queue=QUEUE)
    with pytest.raises(JobFailedError) as raised:
        client.job(async_result.id).result(timeout=60)
    assert raised.value.code is code
    assert raised.value.error.message
    assert embed_worker.alive()
    assert client.embed(["the next job is fine"]).result(timeout=60).dim == 384


def test_structured_error_is_stored_as_documented(raw_app, redis_client, embed_worker):
    async_result = raw_app.send_task(TASK_EMBED, args=[{"texts": []}], queue=QUEUE)
    async_result.get(timeout=60, propagate=False)
    assert async_result.state == "FAILURE"
    meta = json.loads(redis_client.get(f"celery-task-meta-{async_result.id}"))
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "JobFailedError"
    assert meta["result"]["exc_module"] == "producer.errors"
    code, message, details = meta["result"]["exc_message"]
    assert code == "invalid_input" and "EmbedRequest" in message
    assert details["errors"][0]["loc"] == ["texts"]
