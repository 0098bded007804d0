"""Generation and classification through the queue, on models made by `fleet models init-demo`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from producer import ErrorCode, InvalidRequest, JobFailedError, UnknownModel, WrongModelKind
from producer.contract import Limits
from tests.support.fleet_processes import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_worker(redis_url, demo_registry):
    worker = WorkerProcess(redis_url, "--device", "cpu", "--registry", str(demo_registry),
                           "--models", "topics,tiny-llama", name="test-demo-models")
    worker.wait_ready()
    yield worker
    worker.stop()


def test_greedy_generation_equals_transformers_generate(demo_worker, client, demo_registry):
    directory = demo_registry.parent / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory).eval()
    ids = tokenizer("The Fox and the Grapes", return_tensors="pt")
    with torch.inference_mode():
        reference = model.generate(**ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    expected = tokenizer.decode(reference[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    result = client.generate("The Fox and the Grapes", model="tiny-llama", max_new_tokens=16).result(timeout=60)
    assert result.tokens_generated == 16 and result.finish_reason == "length"
    assert result.text == expected


def test_sampling_is_reproducible_with_a_seed(demo_worker, client):
    options = dict(model="tiny-llama", max_new_tokens=24, temperature=0.9, top_p=0.9)
    first = client.generate("Once upon a time", seed=7, **options).result(timeout=60)
    second = client.generate("Once upon a time", seed=7, **options).result(timeout=60)
    other = client.generate("Once upon a time", seed=8, **options).result(timeout=60)
    assert first.text == second.text
    assert other.text != first.text


def test_stop_string_ends_generation_before_it(demo_worker, client):
    full = client.generate("The Lion", model="tiny-llama", max_new_tokens=24).result(timeout=60).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop
    cut = client.generate("The Lion", model="tiny-llama", max_new_tokens=24, stop=[stop]).result(timeout=60)
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]


def test_streaming_yields_pieces_that_add_up_to_the_text(demo_worker, client):
    handle = client.generate("A Crow", model="tiny-llama", max_new_tokens=20, stream=True)
    pieces = list(handle.stream(timeout=60))
    assert len(pieces) > 1
    assert "".join(pieces) == handle.result(timeout=10).text


def test_classify_texts_returns_topics(demo_worker, client):
    result = client.classify(["The pianist played a sonata.", "Bond prices fell again.", "The puppy barked.",
                              "Heavy rain tomorrow."], model="topics", top_k=2).result(timeout=60)
    assert [p[0].label for p in result.predictions] == ["music", "finance", "animals", "weather"]
    for prediction in result.predictions:
        assert len(prediction) == 2 and prediction[0].score >= prediction[1].score
        assert 0.0 < prediction[0].score <= 1.0


@pytest.mark.parametrize("call, error, code", [
    (lambda c: c.generate("hi", model="nope"), UnknownModel, ErrorCode.UNKNOWN_MODEL),
    (lambda c: c.generate("hi", model="topics"), WrongModelKind, ErrorCode.WRONG_MODEL_KIND),
    (lambda c: c.classify(["hi"], model="tiny-llama"), WrongModelKind, ErrorCode.WRONG_MODEL_KIND),
    (lambda c: c.generate("hi", model="tiny-llama", max_new_tokens=Limits.MAX_NEW_TOKENS + 1), InvalidRequest,
     ErrorCode.INVALID_INPUT),
    (lambda c: c.generate("", model="tiny-llama"), InvalidRequest, ErrorCode.INVALID_INPUT),
    (lambda c: c.generate("hi", model="tiny-llama", top_p=0), InvalidRequest, ErrorCode.INVALID_INPUT),
    (lambda c: c.classify(model="topics"), InvalidRequest, ErrorCode.INVALID_INPUT),
])
def test_client_refuses_bad_generate_and_classify(call, error, code, client, demo_worker):
    with pytest.raises(error) as raised:
        call(client)
    assert raised.value.code is code


@pytest.mark.parametrize("task, payload, code", [
    ("fleet.generate", {"prompt": "hi", "model": "tiny-llama", "max_new_tokens": Limits.MAX_NEW_TOKENS + 1},
     ErrorCode.INVALID_INPUT),
    ("fleet.generate", {"prompt": "   ", "model": "tiny-llama"}, ErrorCode.INVALID_INPUT),
    ("fleet.generate", {"prompt": "hi", "model": "topics"}, ErrorCode.WRONG_MODEL_KIND),
    ("fleet.classify", {"texts": ["hi"], "model": "tiny-llama"}, ErrorCode.WRONG_MODEL_KIND),
    ("fleet.classify", {"inputs": [[0.0, 1.0]], "model": "topics"}, ErrorCode.INVALID_INPUT),
    ("fleet.generate", {"prompt": "hi", "model": "ghost"}, ErrorCode.UNKNOWN_MODEL),
])
def test_worker_refuses_bad_payloads_and_keeps_serving(task, payload, code, client, demo_worker):
    queue = "fleet.generate.tiny-llama" if task == "fleet.generate" else "fleet.classify.topics"
    async_result = client.celery.send_task(task, args=[payload], queue=queue)
    with pytest.raises(JobFailedError) as raised:
        client.job(async_result.id).result(timeout=60)
    assert raised.value.code is code
    assert demo_worker.alive()
    assert client.generate("still", model="tiny-llama", max_new_tokens=2).result(timeout=60).tokens_generated >= 0


def test_cancel_running_generation_stops_it(demo_worker, client):
    from producer import JobCancelled, JobStatus

    handle = client.generate("A long tale", model="tiny-llama", max_new_tokens=Limits.MAX_NEW_TOKENS,
                             stream=True)
    pieces = handle.stream(timeout=60)
    next(pieces)  # it is running
    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(timeout=60)
    assert handle.status() is JobStatus.CANCELLED
