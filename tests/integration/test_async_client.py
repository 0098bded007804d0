"""AsyncFleetClient against Redis and a real worker: same results as the sync client, loop never blocked."""

from __future__ import annotations

import asyncio
import math
import threading
import uuid

import pytest
import redis

from producer import AsyncFleetClient, JobCancelled, JobFailedError, JobStatus, JobTimeout
from producer.contract import inference_queue

pytestmark = pytest.mark.integration

TEXTS = ["The quick brown fox jumps over the lazy dog.", "short", "Quarterly revenue grew by eight percent."]


def cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture()
def loop_thread_io(monkeypatch):
    """Record every blocking (sync redis-py) socket write made while an event loop runs in the thread."""
    offenders = []
    original = redis.connection.AbstractConnection.send_packed_command

    def watched(self, command, check_health=True):
        if asyncio._get_running_loop() is not None:
            offenders.append((threading.current_thread().name, command))
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", watched)
    return offenders


def test_embed_and_result_match_the_sync_client(embed_worker, client, redis_url, loop_thread_io):
    expected = client.embed(TEXTS).result(timeout=120)

    async def main():
        async with AsyncFleetClient(redis_url) as fleet:
            handle = await fleet.embed(TEXTS)
            result = await handle.result(timeout=120)
            return result, await handle.status()

    result, status = asyncio.run(main())
    assert status is JobStatus.SUCCEEDED
    assert result.dim == 384 and len(result.vectors) == 3
    for got, want in zip(result.vectors, expected.vectors):
        assert cosine(got, want) >= 0.9999
    assert loop_thread_io == []  # no blocking Redis I/O on the event loop's thread


def test_many_jobs_concurrently_without_blocking_the_loop(embed_worker, redis_url, loop_thread_io):
    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        async with AsyncFleetClient(redis_url) as fleet:
            tick_task = asyncio.create_task(ticker())

            async def one(n: int):
                handle = await fleet.embed([f"concurrent sentence {n}"])
                return await handle.result(timeout=120)

            singles = await asyncio.gather(*(one(n) for n in range(24)))
            many = await fleet.embed_many([[f"bulk {n}", "second text"] for n in range(30)])
            gathered = await fleet.gather(many, timeout=120)
            completed = [h.id async for h, _ in fleet.as_completed(many, timeout=60)]
            done.set()
            await tick_task
            return singles, many, gathered, completed, ticks

    singles, many, gathered, completed, ticks = asyncio.run(main())
    assert all(r.dim == 384 and len(r.vectors) == 1 for r in singles)
    assert all(len(r.vectors) == 2 for r in gathered)
    assert sorted(completed) == sorted(h.id for h in many)
    assert ticks > 1  # the loop kept running while jobs were in flight
    assert loop_thread_io == []


def test_failures_timeouts_and_unknown_jobs(embed_worker, client, redis_url):
    raw = client.celery.send_task("fleet.embed", args=[{"texts": []}], queue=inference_queue("embed", "minilm"))

    async def main():
        async with AsyncFleetClient(redis_url) as fleet:
            with pytest.raises(JobFailedError) as failed:
                await fleet.job(raw.id).result(timeout=60)
            unknown = fleet.job("00000000-0000-0000-0000-0000000000aa")
            with pytest.raises(JobTimeout):
                await unknown.result(timeout=0.5)
            return failed.value.code.value, await unknown.status()

    code, status = asyncio.run(main())
    assert code == "invalid_input"
    assert status is JobStatus.UNKNOWN


def test_cancel_a_queued_job(embed_worker, client, redis_url):
    worker = embed_worker.name if "@" in embed_worker.name else embed_worker.name + "@"
    destination = [n for reply in client.celery.control.ping(timeout=2) for n in reply if n.startswith(worker)]
    assert destination
    queue = inference_queue("embed", "minilm")
    client.celery.control.cancel_consumer(queue, destination=destination, reply=True)
    try:
        async def submit_and_cancel():
            async with AsyncFleetClient(redis_url) as fleet:
                handle = await fleet.embed(["cancel me before I run"])
                await handle.cancel()
                return handle.id

        job_id = asyncio.run(submit_and_cancel())
    finally:
        client.celery.control.add_consumer(queue, destination=destination, reply=True)

    async def wait():
        async with AsyncFleetClient(redis_url) as fleet:
            handle = fleet.job(job_id)
            with pytest.raises(JobCancelled):
                await handle.result(timeout=60)
            return await handle.status()

    assert asyncio.run(wait()) is JobStatus.CANCELLED


def test_idempotency_key_returns_the_first_job(embed_worker, redis_url):
    async def main():
        async with AsyncFleetClient(redis_url) as fleet:
            key = f"async-idem-{uuid.uuid4()}"
            first = await fleet.embed(["only once"], idempotency_key=key)
            second = await fleet.embed(["only once"], idempotency_key=key)
            return first.id, second.id, (await first.result(timeout=120)).dim

    first, second, dim = asyncio.run(main())
    assert first == second and dim == 384
