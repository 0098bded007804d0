"""GPU fleet: one worker per GPU, each seeing exactly one distinct device; mixed jobs spread over all.

Marked ``gpu``: skipped without CUDA. Run on the lent GPU machine (see docs/BENCHMARKS.md). With
one GPU it is the worker group on CUDA (a spawned device process owning the context, consumers
without torch) serving embed, classify and generate jobs; with more it also shows one worker per
GPU, each on its own device.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from producer import FleetClient
from tests.support.fleet_processes import REPO_ROOT, fleet_executable
from workers.process.embedded_redis import RedisServer
from workers.process.health import read_heartbeats

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

JOBS = int(os.environ.get("FLEET_GPU_TEST_JOBS", "1000"))


def write_random_models(root: Path) -> Path:
    """A random-weight BERT encoder, a classifier on it, and the tiny Llama; returns the registry."""
    from transformers import BertForSequenceClassification

    from bench.models import build_random_bert
    from workers.serving.models.demo_models import write_tiny_llama

    build_random_bert(root / "encoder", num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                      intermediate_size=1024)
    labels = ["a", "b", "c"]
    classifier = BertForSequenceClassification.from_pretrained(
        root / "encoder", num_labels=3, id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)})
    classifier.save_pretrained(root / "classifier")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "classifier" / name).write_bytes((root / "encoder" / name).read_bytes())
    write_tiny_llama(root / "tiny-llama")
    registry = root / "registry.toml"
    registry.write_text(
        f'[models.encoder]\nkind = "embed"\nsource = "dir:{root / "encoder"}"\ndtype = "fp16"\nmax_seq_len = 128\n\n'
        f'[models.classifier]\nkind = "classify"\nsource = "dir:{root / "classifier"}"\ndtype = "fp16"\n'
        f'max_seq_len = 128\n\n'
        f'[models.tiny-llama]\nkind = "generate"\nsource = "dir:{root / "tiny-llama"}"\ndtype = "bf16"\n')
    return registry


def ready(client) -> list[dict]:
    return [b for b in read_heartbeats(client) if b.get("ready")]


def jobs_done_by_worker(client, at_least: int, wait_s: float = 10.0) -> dict[str, int]:
    """Jobs done per ready worker, read from heartbeats; waits (a few beats) for the counts to reach ``at_least``."""
    deadline = time.monotonic() + wait_s
    while True:
        done = {w["name"]: w["jobs_done"] for w in ready(client)}
        if sum(done.values()) >= at_least or time.monotonic() > deadline:
            return done
        time.sleep(0.25)


def test_one_worker_per_gpu_with_mixed_jobs(tmp_path):
    registry = write_random_models(tmp_path)
    server = RedisServer().start()
    env = {**os.environ, "REDIS_URL": server.url, "FLEET_HEARTBEAT_INTERVAL_S": "0.5"}
    up = subprocess.Popen([*fleet_executable(), "up", "--devices", "all", "--registry", str(registry),
                           "--models", "encoder,classifier,tiny-llama"], env=env, cwd=REPO_ROOT)
    try:
        with FleetClient(server.url) as client:
            deadline = time.monotonic() + 300
            while len(ready(client._redis)) < torch.cuda.device_count() and time.monotonic() < deadline:
                assert up.poll() is None
                time.sleep(0.5)
            workers = ready(client._redis)
            assert len(workers) == torch.cuda.device_count()
            assert all(w["visible_gpus"] == 1 and w["device"] == "cuda:0" for w in workers)
            uuids = {w["device_uuid"] for w in workers}
            assert len(uuids) == len(workers) and "" not in uuids

            started = time.perf_counter()
            handles = []
            for i in range(JOBS):
                kind = i % 10
                if kind < 6:
                    handles.append(client.embed([f"sentence {i}"], model="encoder"))
                elif kind < 9:
                    handles.append(client.classify([f"sentence {i}"], model="classifier"))
                else:
                    handles.append(client.generate(f"Story {i}", model="tiny-llama", max_new_tokens=8))
            results = [h.result(timeout=300) for h in handles]
            elapsed = time.perf_counter() - started
            assert len(results) == JOBS and all(r.device == "cuda:0" for r in results)
            done = jobs_done_by_worker(client._redis, at_least=JOBS)
            assert sum(done.values()) >= JOBS and all(count > 0 for count in done.values()), done
            for worker in workers:  # the group: torch in the device process only
                assert "torch/_C" in Path(f"/proc/{worker['device_process']['pid']}/maps").read_text()
                assert not any("torch/_C" in Path(f"/proc/{c['pid']}/maps").read_text() for c in worker["consumers"])
            report = {"jobs": JOBS, "seconds": round(elapsed, 2), "jobs_per_s": round(JOBS / elapsed, 1),
                      "workers": [{"name": w["name"], "device_name": w["device_name"], "uuid": w["device_uuid"],
                                   "visible_gpus": w["visible_gpus"], "jobs_done": done[w["name"]]} for w in workers]}
            print("GPU-FLEET-REPORT " + json.dumps(report))
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], "gpu_fleet.json").write_text(json.dumps(report, indent=2))
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
        server.stop()
