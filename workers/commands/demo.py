"""``fleet demo``: the whole path on a fresh machine, with nothing configured.

Finds Redis at ``REDIS_URL`` (or the default) or starts an embedded one, writes the demo
models once (``fleet models init-demo`` into ``var/demo-models``), starts one CPU worker
process exactly as a user would (``fleet worker ... --train``), and submits real jobs:
embeddings (prints each sentence's nearest neighbour), topic classification of new
sentences, and a training job (an MLP on the digits data set, with live progress and its
held-out accuracy). Then it shuts everything down.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer import EmbedResult, FleetClient, TrainResult
from producer.settings import FleetSettings
from workers.process.embedded_redis import RedisServer, redis_answers
from workers.process.launch import LaunchedWorker, fleet_command

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply today.",
    "Shares dropped as investors sold.",
    "A cat sleeps on the warm windowsill.",
    "The kitten naps in the sunshine by the window.",
    "Rain is expected over the weekend.",
    "The forecast says it will be wet on Saturday.",
]
#: New sentences for the topic classifier (music, finance, animals, weather).
TOPIC_SENTENCES = [
    "The violinist played a beautiful concerto.",
    "The central bank cut interest rates again.",
    "The puppy chased its tail around the garden.",
    "Heavy snow is forecast for tomorrow morning.",
]
WORKER_START_TIMEOUT_S = 180.0
#: Where the demo models are written once and reused (git-ignored).
DEMO_MODELS = Path("var/demo-models")
#: The demo worker's log.
WORKER_LOG = DEMO_MODELS / "worker.log"
#: How often the demo looks at the training job's progress (s).
PROGRESS_POLL_S = 0.25


def demo_registry(console: Console) -> Path:
    """The demo models' registry, writing the models first if they are not there yet."""
    registry = DEMO_MODELS / "registry.toml"
    if not registry.exists():
        with console.status("writing the demo models once (a topic classifier on MiniLM, a tiny Llama) ..."):
            done = subprocess.run([*fleet_command(), "models", "init-demo", "--dir", str(DEMO_MODELS)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fleet models init-demo failed:\n{done.stderr[-3000:]}")
    return registry


def start_worker(redis_url: str, name: str, registry: Path) -> LaunchedWorker:
    """Start ``fleet worker --device cpu --models minilm,topics --train``; its log goes to ``WORKER_LOG``."""
    env = {"FLEET_LOG_LEVEL": os.environ.get("FLEET_LOG_LEVEL", "WARNING"),
           "FLEET_ARTIFACT_DIR": str(DEMO_MODELS / "artifacts")}
    return LaunchedWorker(redis_url, "--device", "cpu", "--registry", str(registry), "--models", "minilm,topics",
                          "--train", name=name, env=env, log_path=WORKER_LOG)


def similarity_table(vectors: list[list[float]]) -> Table:
    """Each sentence's nearest other sentence by cosine similarity (vectors are unit length)."""
    table = Table(title="Nearest sentence by cosine similarity")
    table.add_column("sentence")
    table.add_column("nearest")
    table.add_column("cosine", justify="right")
    for i, vector in enumerate(vectors):
        scores = [(sum(a * b for a, b in zip(vector, other)), j) for j, other in enumerate(vectors) if j != i]
        best, j = max(scores)
        table.add_row(SENTENCES[i], SENTENCES[j], f"{best:.3f}")
    return table


def topics_table(result) -> Table:
    """Each new sentence with its two most likely topics and their scores."""
    table = Table(title=f"Topic classification ({result.model} on {result.device})")
    table.add_column("sentence")
    table.add_column("topic", justify="right")
    table.add_column("runner-up", justify="right")
    for sentence, labels in zip(TOPIC_SENTENCES, result.predictions):
        table.add_row(sentence, *(f"{label.label} {label.score:.2f}" for label in labels))
    return table


def show_training(client: FleetClient, console: Console) -> None:
    """Submit an MLP training job on the digits data set; print its epochs as they finish, then its metrics."""
    handle = client.train("mlp", dataset="digits", epochs=30, seed=0)
    console.print(f"training job {handle.id}: an MLP on 8x8 handwritten digits, 30 epochs")
    last_epoch = 0
    while not handle.status().finished:
        progress = handle.progress()
        if progress is not None and progress.epoch != last_epoch:
            console.print(f"  epoch {progress.epoch:>2}/{progress.epochs}  loss {progress.loss:.4f}  "
                          f"{progress.samples_per_s:.0f} samples/s")
            last_epoch = progress.epoch
        time.sleep(PROGRESS_POLL_S)
    result = cast(TrainResult, handle.result(timeout=10))
    console.print(f"trained in {result.metrics['train_seconds']:.1f} s on {result.device}: held-out accuracy "
                  f"{result.metrics['accuracy']:.4f} ({result.steps} optimizer steps; held-out loss "
                  f"{result.metrics['val_loss_start']:.2f} -> {result.metrics['val_loss']:.3f})")


def run_demo() -> int:
    """Run the demo; return the process exit code."""
    console = Console()
    redis_url = FleetSettings().redis_url
    with ExitStack() as stack:
        if redis_answers(redis_url):
            console.print(f"using Redis at {redis_url}")
        else:
            server = RedisServer().start()
            stack.callback(server.stop)
            console.print(f"no Redis answered at {redis_url}; started an embedded redis-server at {server.url}")
            redis_url = server.url
        registry = demo_registry(console)
        name = f"fleet-demo-{os.getpid()}"
        worker = start_worker(redis_url, name, registry)
        stack.callback(worker.stop, timeout_s=30)
        with console.status("starting a CPU worker and loading all-MiniLM-L6-v2 and the topic classifier ..."):
            worker.wait_ready(WORKER_START_TIMEOUT_S)
        console.print(f"[green]worker ready[/green]: {name} (log: {WORKER_LOG})")

        client = stack.enter_context(FleetClient(redis_url))
        started = time.perf_counter()
        handles = [client.embed([sentence]) for sentence in SENTENCES]
        vectors: list[list[float]] = []
        columns = (TextColumn("embedding jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("jobs", total=len(handles))
            for handle in handles:
                result = cast(EmbedResult, handle.result(timeout=60))
                vectors.append(result.float_vectors()[0])
                progress.advance(task)
        elapsed = time.perf_counter() - started
        console.print(f"{len(handles)} jobs done in {elapsed * 1000:.0f} ms on {result.device}: "
                      f"model {result.model}, {result.dim}-dimensional unit vectors")
        console.print(similarity_table(vectors))
        console.print(topics_table(client.classify(TOPIC_SENTENCES, model="topics", top_k=2).result(timeout=60)))
        show_training(client, console)
        embedded = redis_url != FleetSettings().redis_url
        console.print("shutting down the worker" + (" and the embedded Redis" if embedded else ""))
    return 0
