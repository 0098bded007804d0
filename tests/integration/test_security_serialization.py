"""A message in any serializer but JSON is refused and never executed."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer

from producer.contract import TASK_EMBED, inference_queue
from tests.support.raw_messages import final_meta, task_headers

pytestmark = pytest.mark.integration

QUEUE = inference_queue("embed", "minilm")


class CreatesMarkerWhenUnpickled:
    """Unpickling this runs ``os.system``: the classic pickle exploit."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def publish_raw(redis_url: str, body, serializer: str) -> str:
    """Publish a Celery protocol-2 message for fleet.embed with the given serializer."""
    job_id = str(uuid.uuid4())
    with Connection(redis_url) as connection:
        producer = Producer(connection.channel(), exchange=Exchange(QUEUE, type="direct"), routing_key=QUEUE)
        producer.publish(body, serializer=serializer, headers=task_headers(job_id, TASK_EMBED))
    return job_id


@pytest.mark.parametrize("serializer", ["pickle", "yaml"])
def test_non_json_message_is_refused_and_not_executed(serializer, tmp_path, redis_url, redis_client, client,
                                                      embed_worker):
    marker = tmp_path / "pwned"
    payload = CreatesMarkerWhenUnpickled(marker) if serializer == "pickle" else {"texts": ["yaml body"]}
    body = ((payload,), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    job_id = publish_raw(redis_url, body, serializer)
    # The worker takes it off the queue and refuses it; a JSON job behind it is then served.
    assert client.embed(["behind the bad message"]).result(timeout=60).dim == 384
    deadline = time.monotonic() + 10
    while redis_client.llen(QUEUE) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not marker.exists(), "the pickle payload was executed"
    # Refused, never decoded, and answered (docs/PROTOCOL.md, invalid_message) so that its sender does not wait forever.
    meta = final_meta(redis_client, job_id)
    assert meta["status"] == "FAILURE" and meta["result"]["exc_message"][0] == "invalid_message"
    assert "Fleet reads JSON only" in meta["result"]["exc_message"][1]
    assert embed_worker.alive()
    assert f"refused message {job_id}" in embed_worker.log()
