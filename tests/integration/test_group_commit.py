"""Group commit against a real Redis: many threads' writes share round trips, each gets its own answer.

The result backend's version (workers/queue/results.py): the results of jobs finishing together are
stored in shared pipelines, each is correct, and each wakes the one waiter subscribed to its job.
"""

from __future__ import annotations

import threading

import pytest
import redis

from producer.settings import FleetSettings
from workers.process.embedded_redis import free_port
from workers.queue.group_commit import GroupCommit

pytestmark = pytest.mark.integration

THREADS = 64


def run_together(work, count: int = THREADS) -> list:
    """``work(i)`` on ``count`` threads released at once; their return values (or exceptions), in order."""
    start = threading.Barrier(count)
    outcomes: list = [None] * count

    def run(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = work(index)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each thread got
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_each_caller_gets_its_own_replies_from_shared_round_trips(redis_url):
    client = redis.Redis.from_url(redis_url)
    commit = GroupCommit(lambda: client)
    replies = run_together(lambda i: commit.execute(
        lambda pipe: pipe.set(f"gc:{i}", f"value-{i}").get(f"gc:{i}").incrby(f"gc:n:{i}", i)))
    assert replies == [[True, f"value-{i}".encode(), i] for i in range(THREADS)]
    assert commit.entries == THREADS and commit.round_trips < THREADS  # they were grouped
    client.delete(*[f"gc:{i}" for i in range(THREADS)], *[f"gc:n:{i}" for i in range(THREADS)])


def test_merged_members_go_as_one_command_and_all_take_effect(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.zadd("gc:set", {f"m{i}": i for i in range(THREADS)})
    commit = GroupCommit(lambda: client)
    before = client.info("commandstats").get("cmdstat_zrem", {}).get("calls", 0)
    run_together(lambda i: commit.execute(merge={("zrem", "gc:set"): [f"m{i}"]}))
    assert client.zcard("gc:set") == 0
    calls = client.info("commandstats")["cmdstat_zrem"]["calls"] - before
    assert calls == commit.round_trips < THREADS


def test_a_command_error_is_its_callers_alone(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.set("gc:text", "not a number")
    commit = GroupCommit(lambda: client)
    outcomes = run_together(lambda i: commit.execute(
        lambda pipe: pipe.incr("gc:text") if i == 3 else pipe.set(f"gc:ok:{i}", 1)), count=8)
    assert isinstance(outcomes[3][0], redis.ResponseError)
    assert all(outcome == [True] for index, outcome in enumerate(outcomes) if index != 3)


def test_a_connection_failure_reaches_every_caller_of_the_round_trip():
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    commit = GroupCommit(lambda: dead)
    outcomes = run_together(lambda i: commit.execute(lambda pipe: pipe.set("x", i)), count=8)
    assert all(isinstance(outcome, redis.ConnectionError) for outcome in outcomes)


def test_results_stored_together_are_each_correct_and_wake_their_own_waiter(redis_url):
    from celery import Celery, states

    from workers.queue.app import worker_config
    from workers.settings import WorkerSettings

    app = Celery("group-commit-test", set_as_current=False)
    app.conf.update(worker_config(WorkerSettings(**FleetSettings(redis_url=redis_url).model_dump())))
    backend = app.backend
    job_ids = [f"gc-job-{i}" for i in range(THREADS)]
    listener = redis.Redis.from_url(redis_url).pubsub()
    listener.subscribe(*[backend.get_key_for_task(job_id) for job_id in job_ids])
    confirmed = 0
    while confirmed < THREADS:
        message = listener.get_message(timeout=5)
        confirmed += message is not None and message["type"] == "subscribe"
    run_together(lambda i: backend.store_result(job_ids[i], {"answer": i}, states.SUCCESS))
    woken = {}
    while len(woken) < THREADS:
        message = listener.get_message(timeout=5)
        assert message is not None, f"only {len(woken)} of {THREADS} waiters were woken"
        if message["type"] == "message":
            woken[message["channel"].decode()] = backend.decode_result(message["data"])
    for i, job_id in enumerate(job_ids):
        published = woken[backend.get_key_for_task(job_id).decode()]
        assert published["status"] == "SUCCESS" and published["result"] == {"answer": i}
        assert backend.get_task_meta(job_id)["result"] == {"answer": i}
    assert backend.group_commit.round_trips < THREADS
    listener.close()
