"""Checking a chaos run: every job's result against the same models run in this process, and the
workers' logs for jobs computed or stored more than once.

Embeddings must reach cosine >= ``COSINE_MIN`` with the reference, classification labels and
greedy generated text must be equal. ``check`` sorts each job into completed, failed_as_expected,
lost, wrong, failed_unexpectedly or dead_lettered (docs/RELIABILITY.md defines them).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.chaos.workload import Job

FINAL = {"SUCCESS", "FAILURE", "REVOKED"}
COSINE_MIN = 0.9999
_RUN_LINE = re.compile(r"Task (fleet\.\w+)\[([0-9a-f-]{36})\] (succeeded|raised)")


class Reference:
    """The demo models loaded in this process: what each job's result must be."""

    def __init__(self, registry: Path):
        import torch

        from workers.serving.models.loader import load_model
        from workers.serving.registry import load_registry

        torch.set_num_threads(1)
        specs = load_registry(registry)
        self.embedder, _ = load_model(specs["minilm"], "cpu")
        self.classifier, _ = load_model(specs["topics"], "cpu")
        self.generator, _ = load_model(specs["tiny-llama"], "cpu")
        self._cache: dict[str, Any] = {}

    def expected(self, job: Job) -> Any:
        key = json.dumps([job.kind, job.request], sort_keys=True)
        if key not in self._cache:
            self._cache[key] = self._compute(job)
        return self._cache[key]

    def _compute(self, job: Job) -> Any:
        from workers.serving.generation.sampling import Sampling

        if job.kind == "embed":
            return self.embedder.embed(job.request["texts"], True)
        if job.kind == "classify":
            probabilities = self.classifier.run_batch(self.classifier.encode_each(job.request["texts"]))
            labels = []
            for row in probabilities:
                top = row.topk(min(job.request["top_k"], len(self.classifier.labels)))
                labels.append([self.classifier.labels[i] for i in top.indices.tolist()])
            return labels
        sampling = Sampling(max_new_tokens=job.request["max_new_tokens"])
        return self.generator.submit(str(uuid.uuid4()), job.request["prompt"], sampling).wait().text


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def check(job: Job, meta: dict[str, Any] | None, reference: Reference) -> str:
    """Classify one job: completed, failed_as_expected, lost, wrong, failed_unexpectedly, dead_lettered."""
    if meta is None or meta.get("status") not in FINAL:
        return "lost"
    status, result = meta["status"], meta.get("result") or {}
    if job.kind == "invalid":
        code = result.get("exc_message", [None])[0] if isinstance(result, dict) else None
        if status == "FAILURE" and code == job.expected_code:
            return "failed_as_expected"
        return "wrong"
    if status != "SUCCESS":
        details = result.get("exc_message", [None, None, {}]) if isinstance(result, dict) else []
        if len(details) > 2 and isinstance(details[2], dict) and details[2].get("dead_lettered"):
            return "dead_lettered"
        return "failed_unexpectedly"
    expected = reference.expected(job)
    if job.kind == "embed":
        vectors = result.get("vectors", [])
        ok = len(vectors) == len(expected) and all(cosine(v, e) >= COSINE_MIN for v, e in zip(vectors, expected))
    elif job.kind == "classify":
        ok = [[item["label"] for item in row] for row in result.get("predictions", [])] == expected
    else:
        ok = result.get("text") == expected
    return "completed" if ok else "wrong"


def collect_results(client: redis.Redis, jobs: list[Job], settle_timeout_s: float, note: Callable[[str], None]
                    ) -> dict[str, dict[str, Any]]:
    """Wait until every job has a final result, or nothing moved for ``settle_timeout_s`` seconds;
    ``note`` reports how many are left every 10 s."""
    metas: dict[str, dict[str, Any]] = {}
    last_progress = time.monotonic()
    last_report = 0.0
    while True:
        pending = [job.id for job in jobs if job.id not in metas]
        try:
            for start in range(0, len(pending), 1000):
                chunk = pending[start:start + 1000]
                for job_id, raw in zip(chunk, client.mget([f"celery-task-meta-{j}" for j in chunk])):
                    if raw is not None:
                        meta = json.loads(raw)
                        if meta.get("status") in FINAL:
                            metas[job_id] = meta
                            last_progress = time.monotonic()
        except redis.RedisError:
            pass
        remaining = len(jobs) - len(metas)
        if remaining == 0 or time.monotonic() - last_progress > settle_timeout_s:
            return metas
        if time.monotonic() - last_report > 10:
            note(f"waiting for {remaining} job(s)")
            last_report = time.monotonic()
        time.sleep(1.0)


def completed_runs(workdir: Path) -> dict[str, list[tuple[str, str]]]:
    """Per job id, its completed executions ``(timestamp, "succeeded"|"raised")`` over every worker's log."""
    runs: dict[str, list[tuple[str, str]]] = {}
    for log in workdir.glob("chaos-w*.log"):
        for line in log.read_text(errors="replace").splitlines():
            match = _RUN_LINE.search(line)
            if match:
                stamp = line[line.find('"ts": "') + 7:][:24]
                runs.setdefault(match.group(2), []).append((stamp, match.group(3)))
    return {job_id: sorted(entries) for job_id, entries in runs.items()}


def resent_after_loss(workdir: Path) -> int:
    """Jobs the delivery sweeper sent again after their message was lost, over every worker's log."""
    return len({match.group(1) for log in workdir.glob("chaos-w*.log")
                for match in re.finditer(r"job ([0-9a-f-]{36}) was lost in delivery", log.read_text(errors="replace"))})


def stored_more_than_once(entries: list[tuple[str, str]]) -> bool:
    """Whether later runs overwrote the result key: Celery ignores any store after a SUCCESS
    (``Backend._store_result`` reads the key first), so only runs after a first failed run count."""
    return len(entries) >= 2 and entries[0][1] != "succeeded"
