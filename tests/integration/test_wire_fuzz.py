"""Wire fuzzing: hypothesis-made messages against real workers, at two levels.

1. Celery-framed messages, sent with a plain Celery ``send_task`` (below). The worker is the session's
``fleet worker --device cpu --models minilm`` (tests/conftest.py), started as
a user starts it; messages go to its queue with the task names of docs/PROTOCOL.md, bypassing every
client-side check: malformed arguments and keyword arguments, wrong types, missing and unknown fields,
long strings (bounded), odd protocol versions, bad headers and priorities. Each message must end in a
stored result that docs/PROTOCOL.md describes: SUCCESS for a valid job, REVOKED ``expired`` for a deadline
already past, otherwise FAILURE with a ``JobFailedError`` carrying the Fleet error code that the protocol's
rules predict. Never a hang, a lost message, an untyped error or a dead worker; after the run the worker
computes a valid embed job exactly as before.

Left to part 2: the ``id`` and ``task`` headers and the keyword argument ``self``; and out of scope
``ignore_result`` (it asks for no result).

2. Raw kombu messages (``test_no_raw_message_ends_a_supervised_worker_or_goes_unanswered``): body bytes,
content types, content encodings and headers as any producer could send them, to a worker under ``fleet up``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from producer import keys
from producer.client import validate_request
from producer.contract import (
    PROTOCOL_VERSION,
    TASK_CLASSIFY,
    TASK_EMBED,
    TASK_GENERATE,
    ClassifyRequest,
    EmbedRequest,
    ErrorCode,
    GenerateRequest,
    Limits,
    inference_queue,
)
from producer.errors import InvalidRequest
from producer.queues import queue_depth
from tests.support.fleet_processes import REPO_ROOT, fleet_executable, wait_for
from tests.support.raw_messages import RawSender, task_headers
from tests.support.raw_messages import final_meta as raw_final_meta
from tests.unit.test_contract_properties import json_values
from workers.process.embedded_redis import RedisServer
from workers.process.health import read_heartbeats
from workers.queue.wire_guard import UNNAMED_PREFIX

pytestmark = pytest.mark.integration

#: The one queue the session's worker consumes (it serves only ``minilm``, an embedding model).
QUEUE = inference_queue("embed", "minilm")
SERVED_MODEL = "minilm"
MINILM_DIM = 384
REQUEST_FOR_TASK = {TASK_EMBED: EmbedRequest, TASK_CLASSIFY: ClassifyRequest, TASK_GENERATE: GenerateRequest}
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")
RESULT_TIMEOUT_S = 30.0

NOW = datetime.now(UTC)
PAST = (NOW - timedelta(days=1)).isoformat()
FUTURE = (NOW + timedelta(days=365)).isoformat()
FUTURE_NAIVE = (NOW + timedelta(days=365)).replace(tzinfo=None).isoformat()
PAST_NAIVE = (NOW - timedelta(days=1)).replace(tzinfo=None).isoformat()


@dataclass
class WireMessage:
    """One raw message: what ``send_task`` is given."""

    task: str
    args: list
    kwargs: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    priority: int | None = None
    #: Protocol headers sent with a value of the wrong type or form (the oracle's reading, not the worker's).
    bad_headers: tuple[str, ...] = ()
    #: True if an ``expires`` header with a deadline already past was sent.
    past_deadline: bool = False


# --- strategies -------------------------------------------------------------------------------------

short_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
long_text = st.integers(Limits.MAX_CHARS_PER_TEXT - 1, 3 * Limits.MAX_CHARS_PER_TEXT).map(lambda n: "y" * n)

#: Valid request objects per task, small (so that valid embed jobs stay quick on a CPU).
BASES = {
    TASK_EMBED: st.fixed_dictionaries({"texts": st.lists(short_text, min_size=1, max_size=3)}, optional={
        "model": st.just(SERVED_MODEL), "normalize": st.booleans(), "v": st.just(PROTOCOL_VERSION)}),
    TASK_CLASSIFY: st.fixed_dictionaries({"texts": st.lists(short_text, min_size=1, max_size=3),
                                          "model": st.sampled_from([SERVED_MODEL, "topics"])},
                                         optional={"top_k": st.integers(1, Limits.MAX_LABELS_RETURNED)}),
    TASK_GENERATE: st.fixed_dictionaries({"prompt": short_text.filter(str.strip),
                                          "model": st.sampled_from([SERVED_MODEL, "tiny-llama"])},
                                         optional={"max_new_tokens": st.integers(1, Limits.MAX_NEW_TOKENS)}),
}

#: Values that break (or probe) one field.
FIELD_VALUES = {
    "texts": st.one_of(
        st.sampled_from([[], [""], ["ok", 3], "one string", None, ["x"] * (Limits.MAX_TEXTS_PER_JOB + 1)]),
        long_text.map(lambda text: [text]), json_values),
    "prompt": st.one_of(st.sampled_from(["", "  \n\t"]), long_text, json_values),
    "model": st.one_of(st.sampled_from(["ghost", "Bad Name", "", "a" * 65, "../etc/passwd", 5]), json_values),
    "normalize": json_values,
    "v": st.one_of(st.sampled_from([2, 99, 0, -1, "1", True, 1.0, None]), json_values),
    "top_k": st.one_of(st.sampled_from([0, Limits.MAX_LABELS_RETURNED + 1, 1.0, "1"]), json_values),
    "max_new_tokens": st.one_of(st.sampled_from([0, Limits.MAX_NEW_TOKENS + 1, 64.0]), json_values),
}


@st.composite
def request_objects(draw, task: str) -> dict:
    """A valid request for ``task`` with up to two fields broken, removed, or joined by an unknown field."""
    payload = dict(draw(BASES[task]))
    fields = sorted({*payload, "v"} & set(FIELD_VALUES))
    for name in draw(st.lists(st.sampled_from(fields), max_size=2, unique=True)):
        action = draw(st.sampled_from(["value", "value", "drop", "unknown"]))
        if action == "drop":
            payload.pop(name, None)
        elif action == "unknown":
            payload[draw(st.text(min_size=1, max_size=8).filter(lambda key: key not in FIELD_VALUES))] = draw(
                json_values)
        else:
            payload[name] = draw(FIELD_VALUES[name])
    return payload


def arguments(task: str) -> st.SearchStrategy[list]:
    """The task's positional arguments: mostly the one request object, else too few, too many or not an object."""
    request = request_objects(task)
    return st.one_of(
        request.map(lambda obj: [obj]), request.map(lambda obj: [obj]), request.map(lambda obj: [obj]),
        st.just([]),
        request.map(lambda obj: [obj, obj]),
        json_values.map(lambda value: [value]),
    )


keyword_arguments = st.one_of(
    st.just({}), st.just({}), st.just({}),
    st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda key: key != "self"), json_values,
                    min_size=1, max_size=3),
)

#: Header values by whether the protocol (docs/PROTOCOL.md; Celery message protocol 2) allows them.
GOOD_HEADERS = {
    "expires": st.sampled_from([FUTURE, FUTURE_NAIVE, FUTURE[:7], PAST, PAST_NAIVE]),
    "eta": st.sampled_from([PAST, PAST_NAIVE]),  # a future ETA would (rightly) hold the job back
    "timelimit": st.sampled_from([[None, None], [300, 290], [None, 60.5]]),
    "stamped_headers": st.sampled_from([[], ["fuzz"]]),
    "stamps": st.just({"fuzz": "1"}),
    "shadow": st.sampled_from(["fleet.embed", "renamed"]),
}
BAD_HEADERS = {
    "expires": st.sampled_from(["garbage", "2030-13-45", 5, -1.5, [1], {"a": 1}, True]),
    "eta": st.sampled_from(["garbage", "2030-13-45", 5, [1], {"a": 1}]),
    "timelimit": st.sampled_from(["x", 5, -1.5, [1, 2, 3], [None], {"a": 1}, ["a", "b"], [True, None]]),
    "stamped_headers": st.sampled_from([5, -1.5, "x", {"a": 1}, [1, 2]]),
    "stamps": st.sampled_from([5, "x", [1, 2]]),
    "shadow": st.sampled_from([5, [1, 2], {"a": 1}]),
}
#: Headers that Fleet reads only for telemetry, or that Celery only logs or passes on: any value goes.
FREE_HEADERS = ["fleet_enqueued_at", "traceparent", "tracestate", "baggage", "x-fuzz", "lang", "retries",
                "group", "group_index", "root_id", "parent_id", "origin", "argsrepr", "kwargsrepr",
                "replaced_task_nesting"]


@st.composite
def headers(draw) -> tuple[dict, tuple[str, ...], bool]:
    """Extra message headers, the protocol headers among them sent malformed, and whether a deadline is past."""
    chosen: dict[str, Any] = {}
    bad: list[str] = []
    for name in draw(st.lists(st.sampled_from(sorted(GOOD_HEADERS)), max_size=2, unique=True)):
        if draw(st.booleans()):
            chosen[name] = draw(BAD_HEADERS[name])
            bad.append(name)
        else:
            chosen[name] = draw(GOOD_HEADERS[name])
    for name in draw(st.lists(st.sampled_from(FREE_HEADERS), max_size=2, unique=True)):
        chosen[name] = draw(json_values | st.just(time.time()))
    if chosen.get("stamped_headers") == ["fuzz"] and "stamps" not in chosen:
        chosen["stamps"] = {"fuzz": "1"}
    past = "expires" not in bad and chosen.get("expires") in (PAST, PAST_NAIVE)
    return chosen, tuple(bad), past


@st.composite
def wire_messages(draw) -> WireMessage:
    task = draw(st.sampled_from([TASK_EMBED, TASK_EMBED, TASK_EMBED, TASK_CLASSIFY, TASK_GENERATE]))
    extra_headers, bad, past = draw(st.one_of(st.just(({}, (), False)), headers()))
    return WireMessage(task=task, args=draw(arguments(task)), kwargs=draw(keyword_arguments), headers=extra_headers,
                       priority=draw(st.sampled_from([None, 0, 3, 6, 9, -3, 42])), bad_headers=bad,
                       past_deadline=past)


# --- the oracle: what docs/PROTOCOL.md says must happen ---------------------------------------------


def expected_outcome(message: WireMessage) -> tuple[str, str | None]:
    """(state, error code) the protocol's rules give for ``message``; ``("SUCCESS", None)`` for a valid job."""
    if message.past_deadline:
        return "REVOKED", "expired"
    if message.bad_headers:
        return "FAILURE", ErrorCode.INVALID_INPUT.value
    if message.kwargs or len(message.args) != 1 or not isinstance(message.args[0], dict):
        return "FAILURE", ErrorCode.INVALID_INPUT.value  # exactly one positional argument, no keywords
    payload = json.loads(json.dumps(message.args[0]))  # what the worker decodes
    if payload.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        return "FAILURE", ErrorCode.UNSUPPORTED_PROTOCOL.value
    try:
        request = validate_request(REQUEST_FOR_TASK[message.task], payload)
    except InvalidRequest:
        return "FAILURE", ErrorCode.INVALID_INPUT.value
    if request.model != SERVED_MODEL:
        return "FAILURE", ErrorCode.UNKNOWN_MODEL.value
    if message.task != TASK_EMBED:
        return "FAILURE", ErrorCode.WRONG_MODEL_KIND.value
    return "SUCCESS", None


def send(app, message: WireMessage):
    options = {"priority": message.priority} if message.priority is not None else {}
    return app.send_task(message.task, args=message.args, kwargs=message.kwargs, queue=QUEUE,
                         headers=message.headers or None, **options)


def final_meta(redis_client, job_id: str, worker) -> dict:
    """The stored result of ``job_id`` (``celery-task-meta-<id>``, docs/PROTOCOL.md) once in a final state."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        raw = redis_client.get(f"celery-task-meta-{job_id}")
        if raw is not None:
            meta = json.loads(raw)
            if meta["status"] in FINAL_STATES:
                return meta
        assert worker.alive(), f"the worker died on job {job_id}:\n{worker.log()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"no final result for job {job_id} in {RESULT_TIMEOUT_S} s (hung or lost)")


def assert_embed_result(result: dict, texts: list[str], normalize: bool) -> None:
    assert result["model"] == SERVED_MODEL and result["dim"] == MINILM_DIM
    assert len(result["vectors"]) == len(texts)
    for vector in result["vectors"]:
        assert len(vector) == MINILM_DIM and all(math.isfinite(x) for x in vector)
        if normalize:
            assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)


# --- the property -----------------------------------------------------------------------------------

#: Messages that once failed: the worker died, or the job ended in an untyped error or no result.
EXAMPLES = [
    # Celery unpacked ``timelimit`` in the consumer: ValueError, the worker process exited.
    WireMessage(TASK_EMBED, [{"texts": ["a"]}], headers={"timelimit": "x"}, bad_headers=("timelimit",)),
    # ``stamped_headers`` not a list: TypeError in the consumer, the worker process exited.
    WireMessage(TASK_EMBED, [{"texts": ["a"]}], headers={"stamped_headers": 5}, bad_headers=("stamped_headers",)),
    # Not ISO 8601: Celery discarded the message without storing any result (a lost job).
    WireMessage(TASK_EMBED, [{"texts": ["a"]}], headers={"expires": "garbage"}, bad_headers=("expires",)),
    # ISO 8601 without an offset: FAILURE with an untyped TypeError (naive vs aware datetime).
    WireMessage(TASK_EMBED, [{"texts": ["a"]}], headers={"expires": FUTURE_NAIVE}),
    # ISO 8601 that Celery's parser takes but datetime.fromisoformat does not: untyped ValueError.
    WireMessage(TASK_EMBED, [{"texts": ["a"]}], headers={"expires": FUTURE[:7]}),
    # A shadow name that is not a string: the job vanished in the pool, no result.
    WireMessage(TASK_EMBED, [{"texts": ["a"]}], headers={"shadow": [1, 2]}, bad_headers=("shadow",)),
    WireMessage(TASK_EMBED, [{"texts": ["a"]}], headers={"expires": PAST}, past_deadline=True),
    WireMessage(TASK_EMBED, [{"texts": ["\u4e2d" * Limits.MAX_CHARS_PER_TEXT] * 2, "v": 2}]),
    WireMessage(TASK_GENERATE, [{"prompt": "hi", "model": SERVED_MODEL}], priority=42),
]


def test_raw_wire_messages_end_typed_and_the_worker_keeps_serving(raw_app, embed_worker):
    redis_client = raw_app.backend.client
    reference = {"texts": ["The worker survived the fuzzing.", "Bonjour"], "model": SERVED_MODEL}
    before = final_meta(redis_client, send(raw_app, WireMessage(TASK_EMBED, [reference])).id, embed_worker)
    assert before["status"] == "SUCCESS"
    job_ids: list[str] = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(message=wire_messages())
    def one_message(message: WireMessage) -> None:
        async_result = send(raw_app, message)
        job_ids.append(async_result.id)
        meta = final_meta(redis_client, async_result.id, embed_worker)
        state, code = expected_outcome(message)
        event(f"{message.task} -> {state} {code or ''}".rstrip())
        assert meta["status"] == state, f"{meta['status']} {meta['result']!r}, expected {state} {code}"
        result = meta["result"]
        if state == "SUCCESS":
            request = EmbedRequest.model_validate(message.args[0])
            assert_embed_result(result, list(request.texts), request.normalize)
        elif state == "REVOKED":
            assert result["exc_type"] == "TaskRevokedError" and result["exc_message"] == [code]
        else:
            assert (result["exc_type"], result["exc_module"]) == ("JobFailedError", "producer.errors"), result
            got_code, error_message, details = result["exc_message"]
            assert got_code == code, result
            assert error_message and isinstance(details, dict)
        assert embed_worker.alive()

    for message in reversed(EXAMPLES):
        one_message = example(message=message)(one_message)
    one_message()

    # Nothing lost: no message of this run is still queued or held unacknowledged.
    assert queue_depth(redis_client, QUEUE) == 0
    unacked = {json.loads(raw)[0]["headers"]["id"] for raw in redis_client.hvals("unacked")}
    assert not unacked & set(job_ids)

    # The worker is alive and computes a valid job exactly as before the fuzzing.
    assert embed_worker.alive()
    after = final_meta(redis_client, send(raw_app, WireMessage(TASK_EMBED, [reference])).id, embed_worker)
    assert after["status"] == "SUCCESS"
    assert_embed_result(after["result"], reference["texts"], normalize=True)
    for vector_before, vector_after in zip(before["result"]["vectors"], after["result"]["vectors"]):
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(vector_before, vector_after))


# --- raw kombu messages against a supervised worker ------------------------------------------------
#
# Below Celery's own framing: hypothesis-made body bytes, content types, content encodings and headers,
# published with kombu as any producer could, to one worker run by `fleet up` on a private Redis (so a
# worker that died would show as a restart). No message may end the worker; every message that names its
# job gets a final result (FAILURE ``invalid_message`` when the worker cannot run it); every message the
# worker refuses is dead-lettered, under its job id or, when it names none, a generated one.

JSON = "application/json"
#: Content types other than JSON: each is refused before its body is decoded.
OTHER_CONTENT_TYPES = ["", "text/plain", "application/x-python-serialize", "application/x-yaml", "application/data",
                       "application/octet-stream", "application/json; charset=utf-8", "application/x-msgpack"]
EMBED_FIELDS_NONE = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


#: ``RawMessage.job_id`` that stands for a fresh job id, made when the message is sent.
FRESH_ID = "<fresh>"


@dataclass
class RawMessage:
    """One raw message and whether it is framed as docs/PROTOCOL.md asks (then its task validates the request).

    ``job_id`` is the ``id`` header's value, ``FRESH_ID`` for a new job id. The header is always sent, so a
    message whose id is not usable never has its job id read from its body (protocol 1).
    """

    body: bytes
    content_type: str
    content_encoding: str | None
    task: Any
    job_id: Any
    compression: str | None
    well_framed: bool

    def headers(self, fresh_id: str) -> dict:
        headers = task_headers(fresh_id, self.task)
        headers["id"] = fresh_id if self.job_id == FRESH_ID else self.job_id
        if self.task is None:
            del headers["task"]
        if self.compression:
            headers["compression"] = self.compression
        return headers


def dumps(value) -> bytes:
    return json.dumps(value).encode()


#: Bodies framed as Celery message protocol 2: ``[args, kwargs, embed]`` with one request object.
well_framed_bodies = st.builds(
    lambda texts, embed: dumps([[{"texts": texts}], {}, embed]),
    st.one_of(st.lists(short_text, min_size=1, max_size=2), json_values),
    st.sampled_from([None, {}, EMBED_FIELDS_NONE]))
#: Bodies that are not: other JSON, near-misses of the protocol-2 array, deep nesting, other encodings, noise.
ill_framed_bodies = st.one_of(
    json_values.map(dumps),
    st.tuples(json_values, json_values, json_values).map(lambda parts: dumps(list(parts))),
    st.lists(json_values, max_size=5).map(dumps),
    st.builds(lambda kwargs: dumps([[{"texts": ["x"]}], kwargs, None]), st.text(max_size=8) | st.just({"self": 1})),
    st.builds(lambda embed: dumps([[{"texts": ["x"]}], {}, embed]),
              st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=2) | st.lists(json_values)),
    st.integers(2, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.binary(max_size=64),
    st.binary(max_size=16).map(lambda noise: b'[[{"texts": ["' + noise + b'"]}], {}, null]'),
    json_values.map(lambda value: __import__("pickle").dumps(value)),
    json_values.map(lambda value: __import__("yaml").safe_dump(value).encode()),
    st.just(b""),
)


@st.composite
def raw_messages(draw) -> RawMessage:
    framed_body = draw(st.booleans())
    body = draw(well_framed_bodies if framed_body else ill_framed_bodies)
    content_type = draw(st.sampled_from([JSON] * 3 + OTHER_CONTENT_TYPES) | st.text(max_size=12))
    task = draw(st.sampled_from([TASK_EMBED, TASK_EMBED, TASK_CLASSIFY, "fleet.nope", ["fleet.embed"], 5, None]))
    job_id = draw(st.sampled_from([FRESH_ID] * 4 + ["", 5, None, ["x"]]))
    compression = draw(st.sampled_from([None] * 6 + ["application/x-gzip", "application/x-bz2", "bogus"]))
    well_framed = (framed_body and content_type == JSON and task in (TASK_EMBED, TASK_CLASSIFY)
                   and job_id == FRESH_ID and compression is None)
    return RawMessage(body, content_type, draw(st.sampled_from(["utf-8", "binary", "latin-1", None, "bogus"])),
                      task, job_id, compression, well_framed)


@pytest.fixture(scope="module")
def supervised_worker(tmp_path_factory):
    """``fleet up --devices cpu --models minilm`` on a private Redis: (redis url, supervisor log path)."""
    server = RedisServer().start()
    log_path = tmp_path_factory.mktemp("fleet-up") / "up.log"
    env = {**os.environ, "REDIS_URL": server.url, "FLEET_TORCH_THREADS": "1", "FLEET_CONCURRENCY": "4",
           "HF_HUB_OFFLINE": "1", "FLEET_HEARTBEAT_INTERVAL_S": "0.5"}
    with log_path.open("w") as log:
        process = subprocess.Popen([*fleet_executable(), "up", "--devices", "cpu", "--models", "minilm"], env=env,
                                   cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield server.url, log_path
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        server.stop()


def issue_example(body: bytes, content_type: str = JSON, task: Any = TASK_EMBED) -> RawMessage:
    """A message from issue 19: each one ended the worker or was dropped without a result."""
    return RawMessage(body, content_type, "utf-8", task, FRESH_ID, None, well_framed=False)


RAW_EXAMPLES = [
    issue_example(b""),
    issue_example(dumps({"texts": ["x"]})),
    issue_example(dumps([[{"texts": ["x"]}]])),
    issue_example(dumps(42)),
    issue_example(dumps([[{"texts": ["x"]}], {}, None]), content_type=""),
    issue_example(dumps([[{"texts": ["x"]}], "texts", None])),
    issue_example(b"[" * 100_000 + b"]" * 100_000),
    issue_example(dumps([[{"texts": ["x"]}], {}, None]), task=["fleet.embed"]),
]


def test_no_raw_message_ends_a_supervised_worker_or_goes_unanswered(supervised_worker):
    redis_url, log_path = supervised_worker
    redis_client = redis.Redis.from_url(redis_url)
    worker = wait_for(lambda: [b for b in read_heartbeats(redis_client) if b.get("ready")], 240, "a ready worker")[0]
    sender = RawSender(redis_url)

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(message=raw_messages())
    def one_message(message: RawMessage) -> None:
        dead_letters_before = set(redis_client.hkeys(keys.DEAD_LETTERS))
        job_id = str(uuid.uuid4())
        sender.publish(QUEUE, message.body, content_type=message.content_type,
                       content_encoding=message.content_encoding, headers=message.headers(job_id))
        if message.job_id != FRESH_ID:  # no answer is possible: the message must be dead-lettered under a new id
            new = wait_for(lambda: set(redis_client.hkeys(keys.DEAD_LETTERS)) - dead_letters_before, 30,
                           f"a dead letter for {message}")
            assert [entry.decode().startswith(UNNAMED_PREFIX) for entry in new] == [True]
            event("no job id -> dead-lettered")
            return
        meta = raw_final_meta(redis_client, job_id)
        assert meta is not None, f"no answer to {message}:\n{log_path.read_text()[-3000:]}"
        code = meta["result"]["exc_message"][0] if meta["status"] == "FAILURE" else None
        event(f"{'well' if message.well_framed else 'ill'} framed -> {meta['status']} {code or ''}".rstrip())
        if message.well_framed:
            assert code != ErrorCode.INVALID_MESSAGE.value, meta
        else:
            assert code == ErrorCode.INVALID_MESSAGE.value, meta
            assert (meta["result"]["exc_type"], meta["result"]["exc_module"]) == ("JobFailedError", "producer.errors")
            assert redis_client.hexists(keys.DEAD_LETTERS, job_id)

    for message in RAW_EXAMPLES:
        one_message = example(message=message)(one_message)
    try:
        one_message()
    finally:
        sender.close()
    after = [b for b in read_heartbeats(redis_client) if b.get("ready")]
    assert [b["pid"] for b in after] == [worker["pid"]], "the worker was restarted"
    assert "exited with code" not in log_path.read_text()
