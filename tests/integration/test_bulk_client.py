"""Submitting and collecting many jobs at once, against Redis and a real worker process."""

from __future__ import annotations

import math

import pytest
import redis

from producer import FleetClient, InvalidRequest, JobFailedError, JobStatus, JobTimeout
from producer.contract import inference_queue
from producer.settings import FleetSettings

pytestmark = pytest.mark.integration

QUEUE = inference_queue("embed", "minilm")
MIXED = [
    "short",
    "Hi!",
    "The quick brown fox jumps over the lazy dog.",
    "Quarterly revenue grew by eight percent, beating every forecast the analysts had published.",
    "A much longer sentence that rambles on for a while so that the batch holds inputs of quite different "
    "lengths, which exercises padding and the attention mask in mean pooling, again and again and again.",
    "Embeddings must not depend on batch-mates.",
]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def one_by_one(embed_worker, redis_url):
    """Each text embedded alone: submitted only after the previous job finished (a batch of one)."""
    with FleetClient(redis_url) as client:
        return {text: client.embed([text]).result(timeout=120).vectors[0] for text in MIXED}


def test_many_concurrent_single_text_jobs_equal_one_by_one(embed_worker, client, one_by_one):
    texts = [MIXED[i % len(MIXED)] for i in range(96)]
    handles = client.embed_many([[text] for text in texts])
    assert len(handles) == len(texts) and len({h.id for h in handles}) == len(texts)
    results = client.gather(handles, timeout=180)
    for text, result in zip(texts, results):  # in submission order
        assert result.model == "minilm" and len(result.vectors) == 1
        assert cosine(result.vectors[0], one_by_one[text]) >= 0.9999
    assert handles[0].status() is JobStatus.SUCCEEDED


def test_bulk_jobs_are_split_and_merged_and_keep_input_order(embed_worker, client, one_by_one):
    jobs = [MIXED * 10, MIXED[::-1] * 3, MIXED[:2]]  # 60, 18 and 2 texts: more than one device batch
    results = client.gather(client.embed_many(jobs), timeout=180)
    for texts, result in zip(jobs, results):
        assert len(result.vectors) == len(texts)
        for text, vector in zip(texts, result.vectors):
            assert cosine(vector, one_by_one[text]) >= 0.9999


def test_as_completed_yields_every_job_once(embed_worker, client):
    handles = client.embed_many([[f"sentence number {n}"] for n in range(20)])
    seen = [(handle.id, outcome.dim) for handle, outcome in client.as_completed(handles, timeout=120)]
    assert sorted(job_id for job_id, _ in seen) == sorted(h.id for h in handles)
    assert {dim for _, dim in seen} == {384}


def test_results_finished_before_collecting_are_picked_up(embed_worker, client):
    handles = client.embed_many([["early bird"], ["second early bird"]])
    for handle in handles:
        handle.result(timeout=120)  # both finished: gather must find them without a publish
    assert [r.dim for r in client.gather(handles, timeout=30)] == [384, 384]


def test_failures_and_timeouts_take_their_place(embed_worker, client):
    good = client.embed_many([["fine"], ["also fine"]])
    raw = client.celery.send_task("fleet.embed", args=[{"texts": []}], queue=QUEUE)  # fails in the worker
    never = client.job("00000000-0000-0000-0000-00000000beef")  # never submitted: never finishes
    handles = [good[0], client.job(raw.id), good[1], never]
    outcomes = client.gather(handles, timeout=20, return_exceptions=True)
    assert outcomes[0].dim == 384 and outcomes[2].dim == 384
    assert isinstance(outcomes[1], JobFailedError) and outcomes[1].code.value == "invalid_input"
    assert isinstance(outcomes[3], JobTimeout)
    with pytest.raises(JobFailedError):
        client.gather(handles[:3], timeout=20)


def test_a_bad_entry_refuses_the_whole_submission(client, redis_client, embed_worker):
    before = sum(redis_client.llen(q) for q in (QUEUE, QUEUE + "\x06\x163"))
    records_before = len(redis_client.keys("fleet:job:*"))
    with pytest.raises(InvalidRequest, match="job 1:"):
        client.embed_many([["fine"], [], ["fine"]])
    assert sum(redis_client.llen(q) for q in (QUEUE, QUEUE + "\x06\x163")) == before
    assert len(redis_client.keys("fleet:job:*")) == records_before


def test_publishing_takes_a_constant_number_of_round_trips(embed_worker, redis_url, monkeypatch):
    """Sending 200 jobs costs the same number of socket writes to Redis as sending 5.

    (The queue depth is read at most every ``depth_refresh_s``: a minute here, so that no read falls
    in one of the two calls and not the other.)"""
    client = FleetClient(settings=FleetSettings(redis_url=redis_url, depth_refresh_s=60))
    sends = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sends.append(1)
        return original(self, command, check_health)

    client.embed_many([["warm up the catalog cache and queue declaration"]])
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    counts = {}
    for jobs in (5, 200):
        sends.clear()
        handles = client.embed_many([[f"text {n}"] for n in range(jobs)])
        counts[jobs] = len(sends)
    monkeypatch.undo()
    assert counts[200] == counts[5] <= 4, counts
    client.gather(handles, timeout=180)
    client.close()


def test_submit_many_refuses_bad_options(client, embed_worker):
    with pytest.raises(InvalidRequest, match="priority"):
        client.embed_many([["x"]], priority=12)
    with pytest.raises(InvalidRequest, match="deadline_s"):
        client.embed_many([["x"]], deadline_s=0)
