"""A queued job that is cancelled never runs and reports cancelled."""

from __future__ import annotations

import time

import pytest

from producer import JobCancelled, JobStatus
from producer.contract import inference_queue
from producer.queues import queue_depth

pytestmark = pytest.mark.integration

QUEUE = inference_queue("embed", "minilm")


def test_cancel_queued_job(client, redis_client, embed_worker):
    worker = embed_worker.name + "@" if "@" not in embed_worker.name else embed_worker.name
    destination = [name for name in client.celery.control.ping(timeout=2) for name in name if name.startswith(worker)]
    assert destination, "worker did not answer ping"
    client.celery.control.cancel_consumer(QUEUE, destination=destination, reply=True)
    try:
        handle = client.embed(["cancel me before I run"])
        deadline = time.monotonic() + 5
        while queue_depth(redis_client, QUEUE) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.status() is JobStatus.QUEUED
        handle.cancel()
    finally:
        client.celery.control.add_consumer(QUEUE, destination=destination, reply=True)
    with pytest.raises(JobCancelled):
        handle.result(timeout=60)
    assert handle.status() is JobStatus.CANCELLED
    assert client.embed(["still serving"]).result(timeout=60).dim == 384
