"""Continuous batching through the queue: a private redis-server and one real `fleet worker` serving
the demo's tiny Llama under two names, ``gen-wide`` (16 sequences decoding at once) and
``gen-narrow`` (2, each decoding step paced to 20 ms by tests/support/paced_generator.py so that
a 512-token job is still running while an 8-token one comes and goes), as a registry would
declare them.

Concurrency is read from the jobs' Redis streams: each piece's entry id starts with the
millisecond Redis appended it, so the interval from a job's first to its last piece is when it
decoded. Nothing asserts a duration.
"""

from __future__ import annotations

import pytest

from producer import ErrorCode, JobCancelled, JobFailedError, JobStatus, keys
from tests.support.fleet_processes import WorkerProcess

pytestmark = pytest.mark.integration

PROMPTS = [("The Fox and the Grapes. " * (1 + i % 5)) + f"Tale {i}" for i in range(16)]
NEW_TOKENS = [24 + (i * 13) % 60 for i in range(16)]


@pytest.fixture(scope="module")
def batching_registry(demo_registry, tmp_path_factory):
    tiny_llama = demo_registry.parent / "tiny-llama"
    registry = tmp_path_factory.mktemp("generation-registry") / "registry.toml"
    registry.write_text("".join(f"""
[models.{name}]
kind = "generate"
source = "dir:{tiny_llama}"
max_batch_size = {sequences}
max_seq_len = 1024
{impl}
""" for name, sequences, impl in (("gen-wide", 16, ""),
                                   ("gen-narrow", 2, 'impl = "tests.support.paced_generator:paced_generator"'))))
    return registry


@pytest.fixture(scope="module")
def generation_worker(redis_url, batching_registry):
    worker = WorkerProcess(redis_url, "--device", "cpu", "--registry", str(batching_registry),
                           "--models", "gen-wide,gen-narrow", name="test-generation-batching",
                           env={"FLEET_CONCURRENCY": "24"})
    worker.wait_ready()
    yield worker
    worker.stop()


def stream_span(redis_client, job_id: str) -> tuple[int, int]:
    """Milliseconds at which the job's first and last pieces were appended to its stream."""
    entries = [entry for entry in redis_client.xrange(keys.token_stream(job_id)) if b"piece" in entry[1]]
    assert entries, f"job {job_id} streamed no piece"
    return int(entries[0][0].split(b"-")[0]), int(entries[-1][0].split(b"-")[0])


def pieces_of(redis_client, job_id: str) -> list[str]:
    return [fields[b"piece"].decode() for _, fields in redis_client.xrange(keys.token_stream(job_id))
            if b"piece" in fields]


def test_sixteen_concurrent_jobs_get_exactly_the_text_they_get_alone(generation_worker, client, redis_client):
    requests = [{"prompt": prompt, "model": "gen-wide", "max_new_tokens": n, "stream": True}
                for prompt, n in zip(PROMPTS, NEW_TOKENS)]
    alone = [client.generate(**request).result(timeout=120) for request in requests]
    handles = client.submit_many("generate", requests)
    batched = client.gather(handles, timeout=300)
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.tokens_generated for r in batched] == [r.tokens_generated for r in alone]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]
    spans = [stream_span(redis_client, handle.id) for handle in handles]
    for index, (first, last) in enumerate(spans):  # each decoded while another one did: one batch
        assert any(other_first < last and first < other_last
                   for other, (other_first, other_last) in enumerate(spans) if other != index), index
    for handle, result in zip(handles, batched):
        assert "".join(pieces_of(redis_client, handle.id)) == result.text


def test_a_job_cancelled_mid_stream_ends_its_stream_and_frees_its_slot(generation_worker, client, redis_client):
    cancelled = client.generate("A long tale", model="gen-narrow", max_new_tokens=512, stream=True)
    running = client.generate("The Lion", model="gen-narrow", max_new_tokens=512, stream=True)
    pieces = cancelled.stream(timeout=120)
    next(pieces)
    next(running.stream(timeout=120))  # both of gen-narrow's two slots are taken
    waiting = client.generate("A Crow", model="gen-narrow", max_new_tokens=8, stream=True)
    cancelled.cancel()
    with pytest.raises(JobCancelled):
        list(pieces)  # the stream ends (its end marker), then the job reads as cancelled
    assert cancelled.status() is JobStatus.CANCELLED
    assert waiting.result(timeout=120).tokens_generated == 8
    full = running.result(timeout=300)
    assert full.finish_reason == "length" and full.tokens_generated == 512
    waiting_first, waiting_last = stream_span(redis_client, waiting.id)
    _, cancelled_last = stream_span(redis_client, cancelled.id)
    _, running_last = stream_span(redis_client, running.id)
    assert cancelled_last <= waiting_first  # the waiting job started in the slot the cancel freed ...
    assert waiting_last < running_last  # ... and finished while `running` went on
    assert "".join(pieces_of(redis_client, running.id)) == full.text


def test_a_stop_string_ends_only_its_own_job_and_its_stream_matches_its_result(generation_worker, client,
                                                                                redis_client):
    prompt = "The Fox and the Grapes"
    full = client.generate(prompt, model="gen-wide", max_new_tokens=40).result(timeout=120).text
    stop = full[len(full) // 2:len(full) // 2 + 4]
    stopped = client.generate(prompt, model="gen-wide", max_new_tokens=40, stop=[stop], stream=True)
    other = client.generate(prompt, model="gen-wide", max_new_tokens=40, stream=True)
    streamed = "".join(stopped.stream(timeout=120))
    result = stopped.result(timeout=60)
    assert result.finish_reason == "stop" and result.text == full[:full.index(stop)]
    assert streamed == result.text  # no piece showed text that the stop string then cut
    assert other.result(timeout=120).text == full


def test_a_prompt_longer_than_the_limit_fails_with_a_typed_error(generation_worker, client):
    prompt = "The Fox and the Grapes. " * 120
    handle = client.generate(prompt, model="gen-wide", max_new_tokens=512, stream=True)
    with pytest.raises(JobFailedError) as failed:
        handle.result(timeout=120)
    assert failed.value.code is ErrorCode.PROMPT_TOO_LONG
    details = failed.value.error.details
    assert details["max_prompt_tokens"] == 1024 - 512 < details["prompt_tokens"]
    assert details["max_new_tokens"] == 512 and details["max_seq_len"] == 1024
    with pytest.raises(JobFailedError):
        list(handle.stream(timeout=30))  # the stream got its end marker: a reader does not hang
    truncated = client.generate(prompt, model="gen-wide", max_new_tokens=512, truncate=True).result(timeout=300)
    assert truncated.tokens_generated == 512
