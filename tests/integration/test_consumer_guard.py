"""A message whose ``task`` header is a list or a dict fails its job; the worker keeps serving."""

from __future__ import annotations

import time
import uuid

import pytest

from producer.contract import ErrorCode, inference_queue

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("task_header", [["fleet.embed"], {"name": "fleet.embed"}])
def test_a_task_header_that_is_not_a_name_fails_the_job_not_the_worker(embed_worker, client, raw_app,
                                                                       task_header):
    job_id = str(uuid.uuid4())
    raw_app.send_task("fleet.embed", args=[{"texts": ["a"]}], task_id=job_id,
                      queue=inference_queue("embed", "minilm"), headers={"task": task_header})
    meta = raw_app.backend.get_task_meta(job_id)
    deadline = time.monotonic() + 30
    while meta["status"] == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.1)
        meta = raw_app.backend.get_task_meta(job_id)
    assert meta["status"] == "FAILURE"
    code, message, details = meta["result"].args
    assert code == ErrorCode.INVALID_INPUT.value and "task" in details["headers"]
    assert embed_worker.alive()
    assert client.embed(["still serving"]).result(timeout=60).dim == 384
