"""CUDA paths of the embedder: graph replay equals eager, fp16, buckets. Skipped without CUDA.

Run on the GPU machine: ``python -m pytest -m gpu tests/unit/test_batching_gpu.py``.
"""

from __future__ import annotations

import random
import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from bench.models import build_random_bert

    # BERT-base shape, fewer layers to keep the test quick; same kernels per layer.
    return build_random_bert(tmp_path_factory.mktemp("bert"), num_hidden_layers=4)


def make_embedder(bert_dir, *, dtype: str, graphs: bool, max_batch_size: int = 16):
    from producer.contract import ModelKind
    from workers.serving.models.embedder import Embedder
    from workers.serving.registry import ModelSpec

    spec = ModelSpec(name="bert-test", kind=ModelKind.EMBED, source=f"dir:{bert_dir}", dtype=dtype,
                     max_batch_size=max_batch_size, max_seq_len=128)
    embedder = Embedder(spec, "cuda:0", cuda_graphs=graphs)
    embedder.warmup()
    return embedder


def mixed_texts(count: int, seed: int = 1) -> list[str]:
    from bench.models import SentenceMaker

    maker, rng = SentenceMaker(seed=seed), random.Random(seed)
    return [maker.sentence(rng.choice([1, 3, 7, 14, 15, 30, 31, 50, 63, 100, 126, 200])) for _ in range(count)]


def cosine_min(a, b) -> float:
    return torch.nn.functional.cosine_similarity(torch.stack(a).float(), torch.stack(b).float(), dim=1).min().item()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_graph_replay_equals_eager_for_mixed_lengths(bert_dir, dtype):
    graphed = make_embedder(bert_dir, dtype=dtype, graphs=True)
    eager = make_embedder(bert_dir, dtype=dtype, graphs=False)
    assert graphed.graph_report.enabled, graphed.graph_report.error
    assert graphed.graph_report.captured == len(graphed.batch_buckets) * len(graphed.seq_buckets)
    assert graphed.model.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    texts = mixed_texts(61)
    for size in (1, 2, 3, 5, 8, 13, 16):
        ids = graphed.encode_each(texts[:size])
        before = graphed.graph_report.replays
        got = graphed.run_batch(ids)
        assert graphed.graph_report.replays == before + 1  # served by a graph, not eagerly
        want = eager.run_batch(ids)
        assert len(got) == size and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in got)
        assert cosine_min(got, want) >= 0.999


def test_batch_composition_does_not_change_a_vector(bert_dir):
    graphed = make_embedder(bert_dir, dtype="fp16", graphs=True)
    texts = mixed_texts(16, seed=3)
    ids = graphed.encode_each(texts)
    together = graphed.run_batch(ids)
    alone = [graphed.run_batch([one])[0] for one in ids]
    assert cosine_min(together, alone) >= 0.999


def test_fp16_graphs_agree_with_fp32_eager(bert_dir):
    graphed = make_embedder(bert_dir, dtype="fp16", graphs=True)
    reference = make_embedder(bert_dir, dtype="fp32", graphs=False)
    ids = graphed.encode_each(mixed_texts(12, seed=5))
    assert cosine_min(graphed.run_batch(ids), reference.run_batch(ids)) >= 0.99


def test_shapes_beyond_the_buckets_run_eagerly(bert_dir):
    graphed = make_embedder(bert_dir, dtype="fp16", graphs=True, max_batch_size=4)
    ids = graphed.encode_each(mixed_texts(6, seed=7))  # more rows than the largest batch bucket
    before = graphed.graph_report.eager_batches
    assert len(graphed.run_batch(ids)) == 6
    assert graphed.graph_report.eager_batches == before + 1


def test_graphs_are_captured_while_another_model_keeps_computing(bert_dir):
    """A model loaded into a serving worker (issue 15): its CUDA graphs are captured on the loading thread
    while another model's batches keep running on theirs, and neither fails."""
    import threading

    serving = make_embedder(bert_dir, dtype="fp16", graphs=True)
    ids = serving.encode_each(mixed_texts(8, seed=9))
    finished, errors, stop = [], [], threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                serving.run_batch(ids)
                finished.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - what the test is about
                errors.append(exc)
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while not finished and thread.is_alive():
        time.sleep(0.01)
    loading_from = time.monotonic()
    loaded = make_embedder(bert_dir, dtype="fp16", graphs=True)
    loading_to = time.monotonic()
    stop.set()
    thread.join()
    assert not errors, errors
    assert loaded.graph_report.captured == len(loaded.batch_buckets) * len(loaded.seq_buckets), \
        loaded.graph_report.error
    assert any(loading_from <= at <= loading_to for at in finished), "the serving model stopped while the other loaded"
    before = loaded.graph_report.replays
    assert cosine_min(loaded.run_batch(ids), serving.run_batch(ids)) >= 0.999
    assert loaded.graph_report.replays == before + 1
