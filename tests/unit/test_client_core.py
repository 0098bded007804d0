"""The client core (producer/core/) on its own: no Redis, no worker. These are its decisions, checked
directly; the contract suite (tests/integration/test_client_contract.py) checks them through both clients."""

from __future__ import annotations

import json
import math
import uuid

import pytest
from celery import Celery
from celery.app.task import Context

from producer.contract import JobStatus, ModelKind
from producer.core.catalog import Catalog, live_models, parse_catalog
from producer.core.depth import DepthEstimates
from producer.core.jobs import HEADER_RESULT_TTL, new_client_prefix, new_job_id, plan_jobs, request_fingerprint
from producer.core.options import parse_options
from producer.core.requests import build_many, build_request, embed_fields
from producer.core.results import decode_meta, outcome, status_of, unstarted_marker
from producer.core.router import ResultRouter
from producer.core.waits import RECHECK_S, JobInfo, Wait
from producer.errors import (
    InvalidRequestError,
    JobExpiredError,
    JobFailedError,
    JobIdConflictError,
    JobTimeoutError,
    ModelUnavailableError,
    UnknownModelError,
    WrongModelKindError,
)


def _meta(status: str, result: object = None) -> bytes:
    return json.dumps({"status": status, "result": result}).encode()


DONE = _meta("SUCCESS", {"model": "m", "device": "cpu", "dim": 1, "vectors": [[1.0]]})


# --- job ids ---------------------------------------------------------------------------------------------


def test_generated_job_ids_are_uuid4_strings_that_start_with_the_client_prefix():
    prefix = new_client_prefix()
    ids = {new_job_id(prefix) for _ in range(1000)}
    assert len(ids) == 1000 and len(prefix) == 8
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert str(parsed) == job_id and parsed.version == 4 and job_id.startswith(prefix)


def test_plans_carry_deadline_ttl_header_and_refuse_an_id_twice():
    request, options = build_request("embed", embed_fields(["a"], "minilm", True, "float"),
                                     {"deadline_s": 5, "result_ttl_s": 30})
    [plan] = plan_jobs("embed", [request], ["fleet.embed.minilm"], options, "abcdef12", now=1000.0)
    assert plan.job_id.startswith("abcdef12") and plan.expires_at == 1005.0
    assert plan.headers() == {HEADER_RESULT_TTL: 30}
    assert plan.record(1000.0)["expires"].startswith("1970-01-01T00:16:45")
    twice = parse_options({"job_ids": ["x", "x"]}, bulk=True)
    with pytest.raises(JobIdConflictError, match="twice"):
        plan_jobs("embed", [request, request], ["q", "q"], twice, "abcdef12", now=0.0)


def test_the_idempotency_fingerprint_is_the_request_not_its_options():
    one, _ = build_request("embed", embed_fields(["a"], "minilm", True, "float"), {"priority": 0})
    same, _ = build_request("embed", embed_fields(["a"], "minilm", True, "float"), {"deadline_s": 9})
    other, _ = build_request("embed", embed_fields(["a", "b"], "minilm", True, "float"), {})
    assert request_fingerprint("embed", one) == request_fingerprint("embed", same)
    assert request_fingerprint("embed", one) != request_fingerprint("embed", other)


# --- options and requests -----------------------------------------------------------------------------------


def test_options_refuse_typos_with_a_suggestion_and_wrong_types():
    with pytest.raises(InvalidRequestError, match="did you mean 'idempotency_key'"):
        parse_options({"idempotency": "k"})
    with pytest.raises(InvalidRequestError, match="did you mean 'job_ids'"):
        parse_options({"job_id": "x"}, bulk=True)  # bulk submissions take one id per job
    for bad in ({"priority": 2.5}, {"priority": True}, {"priority": 10}, {"deadline_s": math.inf},
                {"idempotency_key": "\t"}, {"result_ttl_s": 31 * 24 * 3600}):
        with pytest.raises(InvalidRequestError):
            parse_options(bad)
    assert parse_options({"priority": 0, "deadline_s": 1.5}).priority == 0


def test_a_bad_entry_of_a_bulk_submission_is_named_by_its_index():
    with pytest.raises(InvalidRequestError, match="job 1: texts must be a list"):
        build_many("embed", [["fine"], "a lone string"], lambda texts: embed_fields(texts, "minilm", True, "float"))


# --- results ------------------------------------------------------------------------------------------------


def test_the_unstarted_marker_is_what_celery_itself_stores_for_a_revoked_job():
    app = Celery("marker", backend="cache+memory://", set_as_current=False)
    app.conf.update(result_serializer="json", accept_content=["json"], result_accept_content=["json"])
    app.backend.mark_as_revoked("job-1", reason="expired", request=Context(id="job-1"))  # as a worker does
    celery_meta = json.loads(app.backend.client.get(app.backend.get_key_for_task("job-1")))
    ours = json.loads(unstarted_marker("job-1", "expired", 0.0))
    assert {**ours, "date_done": None} == {**celery_meta, "date_done": None}
    assert app.backend.decode_result(unstarted_marker("job-1", "expired", 0.0))["status"] == "REVOKED"


def test_statuses_and_outcomes():
    expired = decode_meta(unstarted_marker("j", "expired", 0.0))
    assert status_of(expired, has_record=True) is JobStatus.EXPIRED
    assert isinstance(outcome("j", expired, "embed"), JobExpiredError)
    assert status_of(None, has_record=True) is JobStatus.QUEUED and status_of(None, False) is JobStatus.UNKNOWN
    failure = decode_meta(_meta("FAILURE", {"exc_type": "JobFailedError", "exc_module": "producer.errors",
                                            "exc_message": ["model_error", "boom", {"attempts": 3}]}))
    error = outcome("j", failure, "embed")
    assert isinstance(error, JobFailedError) and error.code.value == "model_error" and error.error.details == {
        "attempts": 3}
    assert outcome("j", decode_meta(DONE), None).dim == 1  # no kind known: typed by the result's fields
    assert outcome("j", decode_meta(b"not json"), "embed").code.value == "internal"


# --- the router ---------------------------------------------------------------------------------------------


def test_a_result_that_arrives_before_its_waiter_is_kept_for_it():
    router = ResultRouter("abcdef12")
    router.on_pattern_confirmed()
    coverage = router.coverage()
    job_id = new_job_id("abcdef12")
    router.on_message(f"celery-task-meta-{job_id}", _meta("STARTED"))  # not an outcome: ignored
    router.on_message(f"celery-task-meta-{job_id}", DONE)
    plan = router.watch([(job_id, coverage)], lambda *_: None)
    assert [job for job, _ in plan.ready] == [job_id] and plan.read_now == [] and plan.subscribe == []


def test_pushed_results_go_to_their_waiters_and_nothing_is_read():
    router = ResultRouter("abcdef12")
    router.on_pattern_confirmed()
    coverage = router.coverage()
    job_id = new_job_id("abcdef12")
    got = []
    plan = router.watch([(job_id, coverage)], lambda job, meta: got.append((job, meta.state)))
    assert plan.read_now == [] and plan.subscribe == []
    router.on_message(f"celery-task-meta-{job_id}", DONE)
    assert got == [(job_id, "SUCCESS")]


def test_a_gap_in_the_push_makes_the_waiter_read():
    router = ResultRouter("abcdef12", early_max=2)
    router.on_pattern_confirmed()
    before = router.coverage()
    for _ in range(3):  # one more early result than the cache keeps: one is dropped
        router.on_message(f"celery-task-meta-{new_job_id('abcdef12')}", DONE)
    job_id = new_job_id("abcdef12")
    assert router.watch([(job_id, before)], lambda *_: None).read_now == [job_id]
    assert router.on_pattern_confirmed() == [job_id]  # a reconnect: everything watched is read again
    assert router.watch([(new_job_id("abcdef12"), None)], lambda *_: None).read_now  # published before the first wait


def test_foreign_jobs_are_subscribed_once_and_read_after_the_confirmation():
    router = ResultRouter("abcdef12")
    router.on_pattern_confirmed()
    first, second = (lambda *_: None), (lambda *_: None)
    assert router.watch([("other-job", None)], first).subscribe == ["other-job"]
    assert router.watch([("other-job", None)], second).subscribe == []  # already asked for
    assert router.on_channel_confirmed("celery-task-meta-other-job") == ["other-job"]
    assert router.unwatch(["other-job"], first) == []
    assert router.unwatch(["other-job"], second) == ["other-job"]  # the last waiter: unsubscribe


# --- waits ----------------------------------------------------------------------------------------------------


class _Handle:
    def __init__(self, job_id: str):
        self.id = job_id


def test_a_wait_marks_a_job_at_its_deadline_once_and_times_out_the_rest():
    handles = [_Handle("a"), _Handle("b")]
    infos = {"a": JobInfo(kind="embed", expires_at=100.0), "b": JobInfo(kind="embed")}
    wait = Wait(handles, infos, timeout=10.0, now=0.0)
    step = wait.step(wall_now=99.0, now=0.0)
    assert step.settle == [] and not step.done and step.pause == 1.0  # wakes at a's deadline
    assert wait.step(wall_now=100.0, now=1.0).settle == ["a"]
    assert wait.step(wall_now=100.5, now=1.5).settle == []  # marked once
    wait.accept("a", decode_meta(unstarted_marker("a", "expired", 100.0)))
    step = wait.step(wall_now=101.0, now=RECHECK_S)
    assert [type(result) for _, result in step.emit] == [JobExpiredError] and step.read == ["b"]
    assert wait.step(wall_now=110.0, now=10.0).done
    [(handle, timed_out)] = wait.finish()
    assert handle.id == "b" and isinstance(timed_out, JobTimeoutError)


# --- catalog and depth --------------------------------------------------------------------------------------------


def test_the_catalog_refuses_unknown_wrong_kind_and_unserved_models():
    catalog = Catalog(cache_s=5.0)
    raw = {b"minilm": json.dumps({"kind": "embed", "queue": "fleet.embed.minilm", "last_seen": 50.0}).encode(),
           b"topics": json.dumps({"kind": "classify", "queue": "fleet.classify.topics"}).encode(), b"bad": b"{"}
    heartbeats = [json.dumps({"models": ["topics"]}).encode(), None]
    catalog.load(parse_catalog(raw), live_models(heartbeats), now=0.0)
    queue = catalog.resolve(ModelKind.CLASSIFY, "topics", wait_for_worker=False, wall_now=60.0)
    assert queue == "fleet.classify.topics"
    with pytest.raises(ModelUnavailableError, match="10 s ago") as raised:
        catalog.resolve(ModelKind.EMBED, "minilm", wait_for_worker=False, wall_now=60.0)
    assert raised.value.last_seen == 50.0
    assert catalog.resolve(ModelKind.EMBED, "minilm", wait_for_worker=True, wall_now=60.0) == "fleet.embed.minilm"
    with pytest.raises(WrongModelKindError):
        catalog.resolve(ModelKind.EMBED, "topics", wait_for_worker=True, wall_now=60.0)
    with pytest.raises(UnknownModelError):
        catalog.resolve(ModelKind.EMBED, "bad", wait_for_worker=True, wall_now=60.0)
    assert catalog.stale(now=5.1) and not catalog.stale(now=4.9)
    assert {name: entry.live for name, entry in catalog.view().items()} == {"minilm": False, "topics": True}


def test_the_depth_estimate_counts_own_submissions_until_it_is_read_again():
    depths = DepthEstimates(refresh_s=0.05)
    assert depths.estimate("q", now=0.0) is None
    depths.record_read("q", 10, now=0.0)
    depths.record_added("q", 3)
    assert depths.estimate("q", now=0.04) == 13
    assert depths.estimate("q", now=0.06) is None  # too old: read it again
