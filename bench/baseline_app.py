"""Plain Celery, one job one forward pass: the baseline that ``bench.run`` measures Fleet against.

What a team would write without Fleet: a Celery app on the Redis broker and result backend,
JSON only, the solo pool (one job at a time in the worker's own process, so the model is
loaded once and never shared across a fork), and one forward pass per job. Everything else
is Celery's defaults (prefetch 4, early ack, no task events).

It registers Fleet's task name and serves Fleet's queue, taking Fleet's JSON request and
returning Fleet's JSON result, so the benchmark drives both systems with the same client and
the same inputs. ``BENCH_MODE`` picks what one job does:

* ``eager`` (default): Fleet's ``Embedder`` without CUDA graphs and without a batcher: on CPU
  exactly Fleet's forward, on CUDA plain eager PyTorch (fp16, SDPA);
* ``graph``: the same ``Embedder`` with its CUDA graphs on (one graph replay per job on CUDA;
  on CPU the same as ``eager``): the best one-job-one-forward a team writes by hand;
* ``noop``: no model at all, a constant vector of the model's width: the Celery hop's own ceiling.

What is compared is the serving path, not two implementations of the model.

Started by ``bench.run`` as::

    python -m celery -A bench.baseline_app worker -P solo -Q fleet.embed.<model>

with ``REDIS_URL``, ``BENCH_MODE``, ``BENCH_MODEL``, ``BENCH_DEVICE``, ``BENCH_TORCH_THREADS`` and, for a model
outside the default registry, ``FLEET_MODEL_REGISTRY`` in the environment.
"""

from __future__ import annotations

import os

import redis
from celery import Celery, signals

from producer.contract import TASK_EMBED

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
READY_KEY = "bench:baseline:ready"

app = Celery("bench-baseline", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
    broker_transport_options={"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"},
    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
)

MODE = os.environ.get("BENCH_MODE", "eager")
#: The no-op job's answer: MiniLM's width (the bench's other model, BERT-base, differs only in size).
NOOP_DIM = 384

_model = None


@signals.worker_init.connect
def _load_model(**_: object) -> None:
    """Load the model once, in the worker process (solo pool: the process that runs the tasks)."""
    global _model
    if MODE == "noop":
        return
    import torch

    from workers.serving.models.embedder import Embedder
    from workers.serving.registry import load_registry
    from workers.settings import WorkerSettings

    threads = int(os.environ.get("BENCH_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    spec = load_registry(WorkerSettings().model_registry)[os.environ.get("BENCH_MODEL", "minilm")]
    _model = Embedder(spec, os.environ.get("BENCH_DEVICE", "cpu"), cuda_graphs=MODE == "graph")
    _model.warmup()  # on CPU: the same (traced) forward as Fleet's; on CUDA: eager, or graphs captured


@signals.worker_ready.connect
def _announce(**_: object) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    client.set(READY_KEY, "1")
    client.close()


@app.task(name=TASK_EMBED)
def embed(request: dict) -> dict:
    """One job, one forward pass over its texts (``noop``: none); returns Fleet's ``EmbedResult`` JSON."""
    if _model is None:  # BENCH_MODE=noop
        return {"model": request.get("model", "noop"), "device": "none", "dim": NOOP_DIM,
                "vectors": [[0.0] * NOOP_DIM for _ in request["texts"]]}
    vectors = _model.embed(list(request["texts"]), bool(request.get("normalize", True)))
    return {"model": request.get("model", _model.spec.name), "device": _model.device, "dim": _model.dim,
            "vectors": vectors}
