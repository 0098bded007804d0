"""The contract both clients keep: every test here runs against ``FleetClient`` and ``AsyncFleetClient``.

Real parts: the session's private redis-server and a real ``fleet worker`` (``embed_worker``).
The async client is driven through ``tests/support/client_adapters.py`` so that one test body
serves both. Jobs meant to stay queued go to a "ghost" model: in the catalog, served by no live
worker (the state a fleet is in after its worker for that model stopped).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from producer import (
    EmbedResult,
    ErrorCode,
    FleetClient,
    FleetConnectionError,
    FleetError,
    IdempotencyConflictError,
    InvalidRequestError,
    JobCancelledError,
    JobExpiredError,
    JobFailedError,
    JobIdConflictError,
    JobStatus,
    JobTimeoutError,
    ModelUnavailableError,
    RedisCommandError,
    TrainProgress,
    TrainResult,
    keys,
)
from producer.contract import inference_queue
from producer.queues import priority_lists, queue_depth
from producer.settings import FleetSettings
from tests.conftest import unique_name
from tests.support.client_adapters import BlockingAsyncClient
from tests.support.fleet_processes import REPO_ROOT, WorkerProcess
from tests.support.redis_topology import AuthRedisServer

pytestmark = pytest.mark.integration

CLIENTS = ["sync", "async"]


@pytest.fixture(params=CLIENTS)
def connect(request, redis_url):
    """``connect(url=None, **settings)``: a client of the kind under test, closed after the test."""
    opened = []

    def connect(url: str | None = None, **settings):
        fleet_settings = FleetSettings(redis_url=url or redis_url, **settings)
        client = (FleetClient(settings=fleet_settings) if request.param == "sync"
                  else BlockingAsyncClient(fleet_settings))
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


@pytest.fixture()
def fleet(connect, embed_worker):
    return connect()


def _ghost(redis_client: redis.Redis, kind: str):
    name = unique_name(f"ghost-{kind}")
    queue = inference_queue(kind, name)
    redis_client.hset(keys.CATALOG, name, json.dumps({"kind": kind, "queue": queue, "last_seen": time.time() - 120}))
    yield name
    redis_client.hdel(keys.CATALOG, name)
    redis_client.delete(*priority_lists(queue))


@pytest.fixture()
def ghost(redis_client):
    """An embed model in the catalog whose worker is gone (last seen 120 s ago)."""
    yield from _ghost(redis_client, "embed")


@pytest.fixture()
def ghost_llm(redis_client):
    """A generate model in the catalog whose worker is gone."""
    yield from _ghost(redis_client, "generate")


def _meta(redis_client: redis.Redis, job_id: str) -> dict:
    return json.loads(redis_client.get(f"celery-task-meta-{job_id}"))


def _job_records(redis_client: redis.Redis) -> int:
    return sum(1 for _ in redis_client.scan_iter(match="fleet:job:*", count=1000))


# --- status and results: one mapping --------------------------------------------------------------------


def test_every_stored_state_reads_the_same(fleet, raw_app):
    """The async client reported an expired job as CANCELLED; both now read states through one core."""
    backend = raw_app.backend
    expected = {}
    for name, store, status in [
        ("expired", lambda job: backend.mark_as_revoked(job, reason="expired"), JobStatus.EXPIRED),
        ("cancelled", lambda job: backend.mark_as_revoked(job, reason="cancelled"), JobStatus.CANCELLED),
        ("started", lambda job: backend.store_result(job, {"pid": 1}, "STARTED"), JobStatus.RUNNING),
        ("failed", lambda job: backend.mark_as_failure(job, JobFailedError("model_error", "boom")), JobStatus.FAILED),
        ("done", lambda job: backend.mark_as_done(job, {"model": "m", "device": "cpu", "dim": 1, "vectors": [[1.0]]}),
         JobStatus.SUCCEEDED),
    ]:
        job_id = f"state-{name}-{uuid.uuid4()}"
        store(job_id)
        expected[job_id] = status
    assert {job_id: fleet.job(job_id).status() for job_id in expected} == expected
    assert fleet.job(f"never-{uuid.uuid4()}").status() is JobStatus.UNKNOWN


def test_outcomes_of_jobs_sent_by_a_plain_celery_client(fleet, raw_app):
    queue = inference_queue("embed", "minilm")
    done = raw_app.send_task("fleet.embed", args=[{"texts": ["typed by its shape"]}], queue=queue)
    failed = raw_app.send_task("fleet.embed", args=[{"texts": []}], queue=queue)
    result = fleet.job(done.id).result(timeout=120)
    assert isinstance(result, EmbedResult) and result.dim == 384  # no job record: typed from the result itself
    with pytest.raises(JobFailedError) as raised:
        fleet.job(failed.id).result(timeout=120)
    assert raised.value.code is ErrorCode.INVALID_INPUT


# --- deadlines: EXPIRED at the deadline, worker or not -------------------------------------------------


def test_a_job_past_its_deadline_reports_expired_though_no_worker_takes_it(fleet, ghost, redis_client, raw_app):
    waited = fleet.embed(["too late"], model=ghost, deadline_s=1, wait_for_worker=True)
    unwatched = fleet.embed(["too late, unwatched"], model=ghost, deadline_s=1, wait_for_worker=True)
    with pytest.raises(JobExpiredError):
        waited.result(timeout=60)
    assert waited.status() is JobStatus.EXPIRED
    time.sleep(0.5)  # the unwatched job's deadline, a moment after the first one's, has passed too
    assert unwatched.status() is JobStatus.EXPIRED  # status() marks it: it will never run
    for job_id in (waited.id, unwatched.id):
        meta = _meta(redis_client, job_id)
        assert meta["status"] == "REVOKED" and meta["task_id"] == job_id
        assert meta["result"] == {"exc_type": "TaskRevokedError", "exc_message": ["expired"],
                                  "exc_module": "celery.exceptions"}
        assert redis_client.zscore(keys.PENDING, job_id) is None  # the delivery sweeper leaves it alone
        assert raw_app.AsyncResult(job_id).state == "REVOKED"  # a plain Celery client reads the marker


# --- idempotency keys and job ids ------------------------------------------------------------------------


def test_an_idempotency_key_binds_to_its_request(fleet, ghost, redis_client):
    key = f"order-{uuid.uuid4()}"
    first = fleet.embed(["pay once"], model=ghost, idempotency_key=key, wait_for_worker=True)
    again = fleet.embed(["pay once"], model=ghost, idempotency_key=key, wait_for_worker=True, deadline_s=600)
    assert again.id == first.id  # the same request (options aside): the first job
    with pytest.raises(IdempotencyConflictError) as raised:
        fleet.embed(["pay once", "and this"], model=ghost, idempotency_key=key, wait_for_worker=True)
    assert raised.value.code is ErrorCode.IDEMPOTENCY_CONFLICT and raised.value.job_id == first.id
    for blank in ("", "   "):
        with pytest.raises(InvalidRequestError, match="idempotency_key"):
            fleet.embed(["pay once"], model=ghost, idempotency_key=blank, wait_for_worker=True)
    assert queue_depth(redis_client, inference_queue("embed", ghost)) == 1


def test_a_job_id_is_never_used_twice(fleet, ghost, redis_client, raw_app):
    queue = inference_queue("embed", ghost)
    taken = f"mine-{uuid.uuid4()}"
    assert fleet.embed(["a"], model=ghost, job_id=taken, wait_for_worker=True).id == taken
    finished = fleet.embed(["finished"])
    finished.result(timeout=120)
    plain = raw_app.send_task("fleet.embed", args=[{"texts": ["plain"]}], queue=inference_queue("embed", "minilm"))
    plain.get(timeout=120)  # a job of a plain Celery client: no job record, only its result
    for reused in (taken, finished.id, plain.id):
        with pytest.raises(JobIdConflictError) as raised:
            fleet.embed(["b"], model=ghost, job_id=reused, wait_for_worker=True)
        assert raised.value.code is ErrorCode.JOB_ID_CONFLICT and raised.value.job_id == reused
    fresh = f"twice-{uuid.uuid4()}"
    with pytest.raises(JobIdConflictError):
        fleet.submit_many("embed", [{"texts": ["x"], "model": ghost}] * 2, job_ids=[fresh, fresh], wait_for_worker=True)
    with pytest.raises(JobIdConflictError):  # one taken id refuses the whole submission
        fleet.submit_many("embed", [{"texts": ["x"], "model": ghost}] * 2, job_ids=[fresh, taken], wait_for_worker=True)
    assert queue_depth(redis_client, queue) == 1  # ``taken`` alone
    assert not redis_client.exists(keys.job_record(fresh))


def test_one_job_id_submitted_from_many_threads_is_taken_once(connect, ghost, embed_worker):
    job_id = f"raced-{uuid.uuid4()}"
    clients = [connect() for _ in range(6)]
    start = threading.Barrier(len(clients))
    outcomes: list = [None] * len(clients)

    def submit(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = clients[index].embed([f"racer {index}"], model=ghost, job_id=job_id,
                                                   wait_for_worker=True).id
        except FleetError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes.count(job_id) == 1, outcomes
    assert sum(isinstance(outcome, JobIdConflictError) for outcome in outcomes) == len(clients) - 1, outcomes


# --- one publish path, with its clean-up ------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_lpush_redis():
    """A Redis whose ``publisher`` user may do everything Fleet does except push messages onto lists."""
    server = AuthRedisServer("admin-Pw-2c81",
                             acl_users=[("publisher", "pub-Pw-5d0e", "~* &* +@all -@dangerous -lpush")])
    server.start()
    yield server
    server.stop()


def test_a_failed_publish_leaves_nothing_behind_for_one_job_or_many(connect, no_lpush_redis):
    admin = redis.Redis.from_url(no_lpush_redis.url)
    model = unique_name("ghost-embed")
    admin.hset(keys.CATALOG, model, json.dumps({"kind": "embed", "queue": inference_queue("embed", model)}))
    fleet = connect(no_lpush_redis.url_for("publisher"), wait_for_worker=True)
    key = f"retry-me-{uuid.uuid4()}"
    with pytest.raises(RedisCommandError, match="lpush"):  # the job was recorded, then its message refused
        fleet.embed(["x"], model=model, idempotency_key=key)
    with pytest.raises(RedisCommandError) as raised:
        fleet.embed_many([["a"], ["b"], ["c"]], model=model)
    assert raised.value.sent_job_ids == []
    assert admin.get(keys.idempotency(key)) is None  # a retry with the key may submit
    assert admin.zcard(keys.PENDING) == 0  # the sweeper will not re-send jobs said to have failed
    assert _job_records(admin) == 0
    retried = connect(no_lpush_redis.url, wait_for_worker=True).embed(["x"], model=model, idempotency_key=key)
    assert admin.get(keys.idempotency(key)).decode().endswith(retried.id)
    assert admin.zscore(keys.PENDING, retried.id) is not None
    assert queue_depth(admin, inference_queue("embed", model)) == 1
    admin.flushall()
    admin.close()


# --- options and inputs are checked, with messages that say what is wrong ---------------------------------


@pytest.mark.parametrize("options, says", [
    ({"dealine_s": 1}, "did you mean 'deadline_s'"),
    ({"priority": 2.5}, "priority"),
    ({"priority": True}, "priority"),
    ({"priority": "3"}, "priority"),
    ({"deadline_s": math.nan}, "not a finite number"),
    ({"deadline_s": 0}, "deadline_s"),
    ({"result_ttl_s": 0}, "result_ttl_s"),
    ({"result_ttl_s": 1.5}, "result_ttl_s"),
    ({"block_s": -1}, "block_s"),
    ({"job_id": "has a space"}, "job_id"),
    ({"wait_for_worker": "yes"}, "wait_for_worker"),
])
def test_bad_submission_options_are_refused_before_anything_is_sent(options, says, fleet, ghost, redis_client):
    with pytest.raises(InvalidRequestError, match=says):
        fleet.embed(["x"], model=ghost, **options)
    assert queue_depth(redis_client, inference_queue("embed", ghost)) == 0


def test_request_messages_name_the_real_problem(fleet):
    with pytest.raises(InvalidRequestError) as raised:
        fleet.classify(inputs=[[math.nan] * 64, [1.0, math.inf]], model="digits-mlp")
    assert [error["msg"] for error in raised.value.errors] == [
        "Value error, feature 0 is not a finite number: nan; 63 more feature(s) of this input too",
        "Value error, feature 1 is not a finite number: inf"]
    with pytest.raises(InvalidRequestError, match="the integer 1; got str '1'"):
        fleet.generate("hi", model="tiny-llama", v="1")
    with pytest.raises(InvalidRequestError, match="did you mean 'max_new_tokens'"):
        fleet.generate("hi", model="tiny-llama", max_new_token=3)


def test_result_ttl_s_travels_as_a_message_header(fleet, ghost, redis_client):
    handle = fleet.embed(["short-lived"], model=ghost, result_ttl_s=30, wait_for_worker=True)
    [raw] = redis_client.lrange(priority_lists(inference_queue("embed", ghost))[1], 0, -1)
    headers = json.loads(raw)["headers"]
    assert headers["id"] == handle.id and headers["fleet_result_ttl_s"] == 30


# --- the live catalog -------------------------------------------------------------------------------------


def test_a_model_no_live_worker_serves_is_refused_unless_the_caller_waits(fleet, ghost, redis_client):
    with pytest.raises(ModelUnavailableError) as raised:
        fleet.embed(["x"], model=ghost)
    assert raised.value.code is ErrorCode.MODEL_UNAVAILABLE and raised.value.model == ghost
    assert ghost in str(raised.value) and "a worker last served it" in str(raised.value)
    assert raised.value.last_seen is not None
    assert queue_depth(redis_client, inference_queue("embed", ghost)) == 0
    fleet.embed(["x"], model=ghost, wait_for_worker=True)  # scale from zero: queued for a future worker
    assert queue_depth(redis_client, inference_queue("embed", ghost)) == 1
    models = fleet.models()
    assert not models[ghost].live
    assert models["minilm"].live and time.time() - models["minilm"].last_seen < 60  # the worker's heartbeat


def test_a_training_job_may_not_register_a_name_the_fleet_already_has(fleet, redis_client):
    taken = unique_name("trained")
    redis_client.hset(keys.TRAINED_MODELS, taken, json.dumps({"name": taken, "kind": "classify"}))
    before = queue_depth(redis_client, "fleet.training")
    for name in ("minilm", taken):  # served by a worker; registered by an earlier training job
        with pytest.raises(InvalidRequestError, match=f"register_as '{name}'"):
            fleet.train("mlp", register_as=name)
    assert queue_depth(redis_client, "fleet.training") == before
    redis_client.hdel(keys.TRAINED_MODELS, taken)


# --- streams and waits end ---------------------------------------------------------------------------------


def test_a_queued_streaming_job_that_is_cancelled_or_expires_ends_its_stream(fleet, ghost_llm, redis_client):
    cancelled = fleet.generate("Once", model=ghost_llm, stream=True, wait_for_worker=True)
    cancelled.cancel()
    with pytest.raises(JobCancelledError):
        list(cancelled.stream(timeout=30))
    assert cancelled.status() is JobStatus.CANCELLED
    expired = fleet.generate("Once", model=ghost_llm, stream=True, deadline_s=1, wait_for_worker=True)
    with pytest.raises(JobExpiredError):
        list(expired.stream(timeout=30))
    for handle, status in ((cancelled, b"cancelled"), (expired, b"expired")):
        entries = redis_client.xrange(keys.token_stream(handle.id))
        assert [fields for _, fields in entries] == [{b"done": b"1", b"status": status}]


def test_every_wait_ends_with_job_timeout(fleet, ghost, ghost_llm):
    silent = fleet.generate("never", model=ghost_llm, stream=True, wait_for_worker=True)
    with pytest.raises(JobTimeoutError):
        list(silent.stream(timeout=6))  # longer than redis-py's 5 s socket timeout
    queued = fleet.embed(["never"], model=ghost, wait_for_worker=True)
    with pytest.raises(JobTimeoutError):
        queued.result(timeout=1)
    [outcome] = fleet.gather([queued], timeout=1, return_exceptions=True)
    assert isinstance(outcome, JobTimeoutError)
    [(handle, outcome)] = list(fleet.as_completed([queued], timeout=1))
    assert handle.id == queued.id and isinstance(outcome, JobTimeoutError)


EXIT_SCRIPT = {
    "sync": """
from producer import FleetClient, JobTimeoutError
client = FleetClient({url!r})
try:
    client.embed(["x"], model={model!r}, wait_for_worker=True).result(timeout=0.5)
except JobTimeoutError:
    print("timed out")
""",
    "async": """
import asyncio
from producer import AsyncFleetClient, JobTimeoutError
async def main():
    client = AsyncFleetClient({url!r})
    try:
        await (await client.embed(["x"], model={model!r}, wait_for_worker=True)).result(timeout=0.5)
    except JobTimeoutError:
        print("timed out")
asyncio.run(main())
""",
}


@pytest.mark.parametrize("flavour", CLIENTS)
def test_a_script_that_times_out_exits_quietly(flavour, redis_url, ghost):
    """No 'Exception ignored in AsyncResult.__del__' (or anything else) on stderr at interpreter exit."""
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT[flavour].format(url=redis_url, model=ghost)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0 and done.stdout == "timed out\n", done.stdout + done.stderr
    assert done.stderr == ""


# --- connection failures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_redis():
    server = AuthRedisServer("right-Pw-41c2").start()
    yield server
    server.stop()


def test_a_wrong_password_is_a_typed_error_naming_the_url_without_the_password(connect, password_redis):
    client = connect(password_redis.url_for(password="wrong-Pw-77d9"))
    for attempt in (lambda: client.embed(["x"]), lambda: client.job("any").result(timeout=2),
                    lambda: client.job("any").status()):
        started = time.monotonic()
        with pytest.raises(FleetConnectionError) as raised:
            attempt()
        print(f"refused in {time.monotonic() - started:.2f} s")  # not retried like an outage
        assert isinstance(raised.value.cause, redis.AuthenticationError)
        assert "wrong-Pw-77d9" not in str(raised.value) and ":**@127.0.0.1" in raised.value.url


# --- the push: one subscription, no command per wait ------------------------------------------------------


def _commands(redis_client: redis.Redis, *names: str) -> dict[str, int]:
    stats = redis_client.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in names}


def test_waiting_for_results_sends_no_command_per_job(fleet, redis_client):
    fleet.embed(["the first wait subscribes"]).result(timeout=120)
    watched = ("subscribe", "unsubscribe", "psubscribe", "mget")
    before = _commands(redis_client, *watched)
    results = [fleet.embed([f"one by one {n}"]).result(timeout=120) for n in range(10)]
    results += fleet.gather(fleet.embed_many([[f"many {n}"] for n in range(10)]), timeout=120)
    after = _commands(redis_client, *watched)
    assert all(result.dim == 384 for result in results)
    assert {name: after[name] - before[name] for name in watched} == dict.fromkeys(watched, 0)


# --- training jobs -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(redis_url, tmp_path_factory):
    worker = WorkerProcess(redis_url, "--device", "cpu", "--train", name=unique_name("contract-trainer"),
                           env={"FLEET_ARTIFACT_DIR": str(tmp_path_factory.mktemp("artifacts"))})
    worker.wait_ready()
    yield worker
    worker.stop()


def test_train_then_follow_progress_to_the_result(connect, trainer):
    fleet = connect()
    handle = fleet.train("mlp", epochs=20)
    seen = []
    while not handle.status().finished:
        progress = handle.progress()
        if progress is not None:
            seen.append(progress)
        time.sleep(0.02)
    result = handle.result(timeout=60)
    assert isinstance(result, TrainResult) and result.metrics["accuracy"] > 0.8
    assert seen and all(isinstance(progress, TrainProgress) for progress in seen)
