"""Batching with the real embedding model in-process (no Redis): batched equals one-by-one.

The padding used by CUDA graphs (rows and columns up to a shape bucket, a prepared 4-D mask)
is checked here on CPU against the exact path, so the GPU path's arithmetic is covered even
where no GPU is present; tests/unit/test_batching_gpu.py checks graph replay itself on CUDA.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from workers.serving.batching import DynamicBatcher
from workers.serving.models.embedder import Embedder, batch_buckets, bucket_for, finish_vectors, seq_buckets
from workers.serving.registry import load_registry
from workers.settings import DEFAULT_REGISTRY

TEXTS = [
    "short",
    "The quick brown fox jumps over the lazy dog.",
    "Quarterly revenue grew by eight percent.",
    "A much longer sentence that rambles on for a while so that the batch holds inputs of quite different "
    "lengths, which exercises padding and the attention mask in mean pooling.",
    "Hi!",
    "Embeddings of the same text must not depend on which other texts share its batch, nor on padding.",
] * 4


@pytest.fixture(scope="module")
def embedder():
    torch.set_num_threads(2)
    model = Embedder(load_registry(DEFAULT_REGISTRY)["minilm"], "cpu")
    model.warmup()
    return model


def cosines(a: list[list[float]], b: list[list[float]]) -> list[float]:
    return torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=1).tolist()


def test_batched_through_the_batcher_equals_one_by_one(embedder):
    one_by_one = [embedder.embed([text])[0] for text in TEXTS]
    batcher = DynamicBatcher("minilm", embedder.run_batch, max_batch_size=8, max_wait_s=0.02)
    try:
        def job(text: str) -> list[float]:
            ids = embedder.encode_each([text])
            futures = batcher.submit(ids, costs=[len(i) for i in ids])
            return finish_vectors([f.result(timeout=120) for f in futures], True)[0]

        with ThreadPoolExecutor(len(TEXTS)) as pool:
            batched = list(pool.map(job, TEXTS))
    finally:
        batcher.close()
    assert min(cosines(batched, one_by_one)) >= 0.9999
    assert batcher.stats.items == len(TEXTS)
    assert batcher.stats.mean_batch_size > 1  # jobs really shared forward passes


def test_bucket_padding_with_a_4d_mask_equals_the_exact_path(embedder):
    ids = embedder.encode_each(TEXTS[:6])
    exact = embedder._forward_exact(ids)
    rows = bucket_for(len(ids), batch_buckets(32))
    cols = bucket_for(max(map(len, ids)), seq_buckets(256))
    assert (rows, cols) == (8, 64)
    padded_ids, padded_mask = embedder._pad_numpy(ids, rows, cols)
    embedder._mask_4d = True  # what CUDA graphs use
    try:
        with torch.inference_mode():
            bucketed = embedder._encode(torch.from_numpy(padded_ids), torch.from_numpy(padded_mask))[:len(ids)]
    finally:
        embedder._mask_4d = False
    assert min(torch.nn.functional.cosine_similarity(exact, bucketed, dim=1).tolist()) >= 0.9999


def test_buckets():
    assert seq_buckets(256) == [16, 32, 64, 128, 256]
    assert seq_buckets(100) == [16, 32, 64, 100]
    assert batch_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert bucket_for(33, batch_buckets(128)) == 64
    assert bucket_for(129, batch_buckets(128)) is None
