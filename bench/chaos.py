"""Chaos run: N mixed jobs while workers are SIGKILLed and restarted at random and Redis restarts.

    python -m bench.chaos --jobs 5000 --kills 10 --redis-restarts 1 --seed 1

What it does:

1. Starts a private redis-server with the append-only file on (appendfsync everysec) and
   ``--workers`` real ``fleet worker`` processes serving ``minilm`` and the demo models
   (``topics``, ``tiny-llama`` from ``fleet models init-demo``), with a short visibility
   timeout (``--visibility-timeout``, default 10 s) so that jobs of killed workers return
   in seconds.
2. Submits ``--jobs`` jobs at ``--rate`` per second through ``FleetClient``: embed,
   classify and greedy generate, plus about 5 % invalid payloads sent raw (bypassing the
   client's validation) that must end in FAILURE with a known error code. A submission
   that raises (Redis restarting) is retried as a new job; only submissions that returned
   count as submitted.
3. Meanwhile, at random moments, SIGKILLs a random worker (and starts a replacement at
   once) ``--kills`` times and restarts Redis ``--redis-restarts`` times (SIGTERM, then
   SIGKILL, alternating, unless ``--redis-signal`` says otherwise).
4. Waits until every job has a final result or nothing moved for ``--settle-timeout`` s,
   then checks every result against the same models run in this process: embeddings
   cosine >= 0.9999, classify labels equal, greedy generate text equal.
5. For every lost job, replays the append-only file of the run's Redis to tell where it was
   lost: ``popped_never_recorded`` (a BRPOP handed its message to a worker that never recorded
   it in kombu's ``unacked`` hash: the worker was SIGKILLed in between), ``never_enqueued`` or
   ``other`` (``unknown`` when the AOF cannot tell, e.g. after an AOF rewrite).

Counts printed (docs/RELIABILITY.md defines them): submitted, completed, failed as expected,
lost (of which lost in delivery and lost otherwise), wrong, failed unexpectedly, dead-lettered,
duplicated, computed twice, stored twice, redelivered, orphan results. Exit status 1 if any of
wrong, failed unexpectedly, dead-lettered, duplicated or lost otherwise is not zero, or if more
jobs were lost in delivery than workers were SIGKILLed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer import FleetClient, keys
from producer.contract import TASK_CLASSIFY, TASK_EMBED, TASK_GENERATE, inference_queue
from producer.settings import FleetSettings
from workers.process.embedded_redis import RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = "minilm,topics,tiny-llama"
FINAL = {"SUCCESS", "FAILURE", "REVOKED"}
COSINE_MIN = 0.9999
_RUN_LINE = re.compile(r"Task (fleet\.\w+)\[([0-9a-f-]{36})\] (succeeded|raised)")

WORDS = ("river stone music market guitar rain storm cat dog forecast shares bank orchestra violin "
         "winter field horse quiet bright quickly slowly beneath above ancient modern little great "
         "bread harbour train station mountain garden letter window candle evening morning island").split()
PROMPTS = ["Once upon a time", "The river", "In the morning the", "She opened the door and", "The old man said",
           "A storm was", "They walked to the", "The king", "It was a dark", "Far away, beyond the hills,",
           "The cat", "Bread and", "Every evening", "The letter read", "Under the bridge"]

#: Raw payloads that must fail with this code: (task, queue model, args, kwargs, expected code).
INVALID = [
    (TASK_EMBED, "minilm", [{"texts": []}], {}, "invalid_input"),
    (TASK_EMBED, "minilm", [{"texts": ["a"], "evil": True}], {}, "invalid_input"),
    (TASK_EMBED, "minilm", [{"v": 99, "texts": ["a"]}], {}, "unsupported_protocol"),
    (TASK_EMBED, "minilm", [{"texts": ["a"], "model": "ghost"}], {}, "unknown_model"),
    (TASK_EMBED, "minilm", [{"texts": ["a"], "model": "topics"}], {}, "wrong_model_kind"),
    (TASK_EMBED, "minilm", [], {"texts": ["keyword arguments"]}, "invalid_input"),
    (TASK_EMBED, "minilm", ["not an object"], {}, "invalid_input"),
    (TASK_CLASSIFY, "topics", [{"texts": ["x"], "model": "topics", "top_k": 0}], {}, "invalid_input"),
    (TASK_GENERATE, "tiny-llama", [{"prompt": "", "model": "tiny-llama"}], {}, "invalid_input"),
    (TASK_GENERATE, "tiny-llama", [{"prompt": "hi", "model": "tiny-llama", "max_new_tokens": 100000}], {},
     "invalid_input"),
]


@dataclass
class Job:
    """One submitted job and what it must produce."""

    id: str
    kind: str  # embed | classify | generate | invalid
    request: dict[str, Any]
    expected_code: str | None = None
    submitted_at: float = 0.0  # when its submission returned: seconds on the clock of ``Fleet.note``


@dataclass
class Fleet:
    """The Redis server and worker processes under test."""

    workdir: Path
    registry: Path
    workers: int
    env: dict[str, str]
    redis_signal: str
    redis_args: list[str] = field(default_factory=list)
    redis: RedisServer | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    generation: int = 0
    kills_done: int = 0
    events: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    t0: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return self.redis.url

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {text}"
        self.events.append(line)
        print(line, flush=True)

    def start_redis(self, port: int | None = None) -> None:
        self.redis = RedisServer(port, appendonly=True, directory=self.workdir / "redis",
                                 extra_args=self.redis_args).start()

    def restart_redis(self, index: int) -> None:
        sig = {"term": signal.SIGTERM, "kill": signal.SIGKILL}.get(
            self.redis_signal, signal.SIGTERM if index % 2 == 0 else signal.SIGKILL)
        started = time.monotonic()
        self.redis.process.send_signal(sig)
        self.redis.process.wait(60)
        time.sleep(0.5)
        self.start_redis(self.redis.port)
        self.note(f"Redis restarted ({signal.Signals(sig).name}), down {time.monotonic() - started:.1f} s")

    def start_worker(self) -> str:
        with self.lock:
            self.generation += 1
            name = f"chaos-w{self.generation}"
        log = (self.workdir / f"{name}.log").open("w")
        env = {**os.environ, **self.env, "REDIS_URL": self.url}
        fleet = Path(sys.executable).with_name("fleet")
        command = [str(fleet)] if fleet.exists() else [sys.executable, "-m", "workers.commands.cli"]
        process = subprocess.Popen([*command, "worker", "--name", name, "--device", "cpu", "--registry",
                                    str(self.registry), "--models", MODELS], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        with self.lock:
            self.processes[name] = process
        return name

    def kill_random_worker(self, rng: random.Random) -> None:
        from workers.process.health import probe

        with self.lock:
            alive = sorted(name for name, process in self.processes.items() if process.poll() is None)
        if not alive:
            return
        ready = []
        try:  # prefer workers that are serving (they hold jobs) over ones still loading
            client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            ready = [name for name in alive if probe(client, worker=name)[0]]
            client.close()
        except redis.RedisError:
            pass
        victim = rng.choice(ready or alive)
        self.processes[victim].send_signal(signal.SIGKILL)
        self.processes[victim].wait(30)
        self.kills_done += 1
        replacement = self.start_worker()
        self.note(f"SIGKILLed {victim}; started {replacement}")

    def wait_ready(self, names: list[str], timeout_s: float = 300.0) -> None:
        from workers.process.health import probe

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"worker {name} exited: see {self.workdir / (name + '.log')}")
                try:
                    if probe(client, worker=name)[0]:
                        pending.remove(name)
                except redis.RedisError:
                    pass
            time.sleep(0.2)
        client.close()
        if pending:
            raise RuntimeError(f"workers not ready in {timeout_s} s: {pending}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.redis is not None:
            self.redis.stop(kill=True)


# --- jobs -------------------------------------------------------------------------------------

def make_jobs(count: int, rng: random.Random) -> list[Job]:
    """``count`` jobs drawn from small pools of distinct requests (so references are cheap)."""
    embed_pool = [{"texts": [" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for _ in range(rng.randint(1, 3))]}
                  for _ in range(300)]
    classify_pool = [{"texts": [" ".join(rng.choices(WORDS, k=rng.randint(3, 20)))], "top_k": rng.randint(1, 3)}
                     for _ in range(150)]
    generate_pool = [{"prompt": prompt, "max_new_tokens": rng.randint(4, 24)} for prompt in PROMPTS]
    jobs = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.05:
            jobs.append(Job("", "invalid", {"case": rng.randrange(len(INVALID))}))
        elif draw < 0.62:
            jobs.append(Job("", "embed", dict(rng.choice(embed_pool))))
        elif draw < 0.90:
            jobs.append(Job("", "classify", dict(rng.choice(classify_pool))))
        else:
            jobs.append(Job("", "generate", dict(rng.choice(generate_pool))))
    return jobs


class Submitter(threading.Thread):
    """Submits ``jobs`` at ``rate`` per second; retries a submission that raised as a new job."""

    def __init__(self, fleet: Fleet, jobs: list[Job], rate: float, settings: FleetSettings):
        super().__init__(name="chaos-submitter", daemon=True)
        self.fleet, self.jobs, self.rate, self.settings = fleet, jobs, rate, settings
        self.submitted: list[Job] = []
        self.submit_errors = Counter()
        self.done = threading.Event()

    def run(self) -> None:
        from celery import Celery

        from producer.celery_config import celery_config

        raw_app = Celery("chaos-raw", set_as_current=False)
        config = celery_config(self.settings)
        config.pop("result_backend", None)
        raw_app.conf.update(config)
        with FleetClient(settings=self.settings) as client:
            started = time.monotonic()
            for index, job in enumerate(self.jobs):
                delay = started + index / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                for attempt in range(60):
                    try:
                        job.id = self._submit(client, raw_app, job)
                        job.submitted_at = time.monotonic() - self.fleet.t0
                        self.submitted.append(job)
                        break
                    except Exception as exc:  # noqa: BLE001 - Redis restarting: retry as a new job
                        self.submit_errors[type(exc).__name__] += 1
                        time.sleep(min(2.0, 0.2 * (attempt + 1)))
        raw_app.close()
        self.done.set()

    @staticmethod
    def _submit(client: FleetClient, raw_app, job: Job) -> str:
        if job.kind == "embed":
            return client.embed(job.request["texts"]).id
        if job.kind == "classify":
            return client.classify(job.request["texts"], model="topics", top_k=job.request["top_k"]).id
        if job.kind == "generate":
            return client.generate(job.request["prompt"], model="tiny-llama", temperature=0,
                                   max_new_tokens=job.request["max_new_tokens"]).id
        task, model, args, kwargs, code = INVALID[job.request["case"]]
        job.expected_code = code
        kind = task.split(".")[1]
        job_id = str(uuid.uuid4())
        raw_app.send_task(task, args=args, kwargs=kwargs, task_id=job_id, queue=inference_queue(kind, model))
        return job_id


# --- checking ---------------------------------------------------------------------------------

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
        from producer.contract import GenerateRequest

        if job.kind == "embed":
            return self.embedder.embed(job.request["texts"], True)
        if job.kind == "classify":
            probabilities = self.classifier.run_batch(self.classifier.encode_each(job.request["texts"]))
            labels = []
            for row in probabilities:
                top = row.topk(min(job.request["top_k"], len(self.classifier.labels)))
                labels.append([self.classifier.labels[i] for i in top.indices.tolist()])
            return labels
        request = GenerateRequest(prompt=job.request["prompt"], model="tiny-llama", temperature=0,
                                  max_new_tokens=job.request["max_new_tokens"])
        return self.generator.generate(request).text


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def check(job: Job, meta: dict[str, Any] | None, reference: Reference) -> str:
    """Classify one job: completed, failed_as_expected, lost, wrong, failed_unexpectedly, dead_lettered."""
    if meta is None or meta.get("status") not in FINAL:
        return "lost"
    status, result = meta["status"], meta.get("result")
    if job.kind == "invalid":
        code = result.get("exc_message", [None])[0] if isinstance(result, dict) else None
        if status == "FAILURE" and code == job.expected_code:
            return "failed_as_expected"
        return "wrong"
    if status != "SUCCESS":
        details = (result or {}).get("exc_message", [None, None, {}]) if isinstance(result, dict) else []
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


def collect_results(client: redis.Redis, jobs: list[Job], settle_timeout_s: float, fleet: Fleet
                    ) -> dict[str, dict[str, Any]]:
    """Wait until every job has a final result, or nothing moved for ``settle_timeout_s`` seconds."""
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
            fleet.note(f"waiting for {remaining} job(s)")
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


# --- where a lost job was lost: replaying Redis' append-only file -----------------------------
#
# Redis logs every write to its append-only file (AOF); a worker's BRPOP is logged as the RPOP it
# amounted to. Replaying the list commands and kombu's ``HSET unacked`` records of that file tells,
# for a job with no result, whether its message was never enqueued, or was handed to a worker by
# a BRPOP and never recorded as unacked (kombu records a delivery with a second command after it
# has read the BRPOP reply: a worker SIGKILLed in between takes the message with it), or neither.

NEVER_ENQUEUED = "never_enqueued"
IN_DELIVERY = "popped_never_recorded"
OTHER = "other"
UNKNOWN = "unknown"
UNACKED_KEY = b"unacked"  # kombu's hash of delivered, unacknowledged messages (no global key prefix)
#: Commands that change lists in ways this replay does not follow: met on a replayed list (any
#: SWAPDB), the AOF cannot tell where jobs were lost.
_UNFOLLOWED = {b"LSET", b"LINSERT", b"RENAME", b"RENAMENX", b"MOVE", b"COPY", b"SORT", b"SWAPDB"}


class AofUnreadable(Exception):
    """The AOF cannot tell where jobs were lost (rewritten, missing, or not understood)."""


def _resp_line(data: bytes, pos: int, marker: bytes) -> tuple[int, int] | None:
    """The integer after ``marker`` on the RESP line at ``pos`` and where the next line starts;
    None when the line is cut short at the end of ``data``."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        return None
    if data[pos:pos + 1] != marker:
        raise AofUnreadable(f"expected {marker!r} at byte {pos}, found {data[pos:pos + 20]!r}")
    return int(data[pos + 1:end]), end + 2


def iter_resp_commands(data: bytes):
    """Yield each command of an AOF body (RESP arrays of bulk strings) as a list of bytes.

    A command cut short at the end of ``data`` (Redis killed mid-write, or still writing) ends the
    iteration; ``#...`` annotation lines (``aof-timestamp-enabled``) are skipped.
    """
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"#":
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                return
            pos = line_end + 2
            continue
        header = _resp_line(data, pos, b"*")
        if header is None:
            return
        count, pos = header
        command = []
        for _ in range(count):
            bulk = _resp_line(data, pos, b"$")
            if bulk is None or bulk[1] + bulk[0] + 2 > len(data):
                return
            length, pos = bulk
            command.append(data[pos:pos + length])
            pos += length + 2
        yield command


def _rdb_length(data: bytes, pos: int) -> tuple[int, bool, int]:
    """An RDB length at ``pos``: (value, whether it is a special string encoding, next position)."""
    first = data[pos]
    kind = first >> 6
    if kind == 0:
        return first & 0x3F, False, pos + 1
    if kind == 1:
        return ((first & 0x3F) << 8) | data[pos + 1], False, pos + 2
    if kind == 3:
        return first & 0x3F, True, pos + 1
    size = 4 if first == 0x80 else 8
    return int.from_bytes(data[pos + 1:pos + 1 + size], "big"), False, pos + 1 + size


def _skip_rdb_string(data: bytes, pos: int) -> int:
    """Position after the RDB string encoded at ``pos``."""
    value, special, pos = _rdb_length(data, pos)
    if not special:
        return pos + value
    if value in (0, 1, 2):  # 8, 16, 32 bit integer
        return pos + (1, 2, 4)[value]
    compressed, _, pos = _rdb_length(data, pos)  # LZF: compressed length, plain length, bytes
    _, _, pos = _rdb_length(data, pos)
    return pos + compressed


def split_rdb_preamble(data: bytes) -> tuple[bool, bytes]:
    """For data that may start with an RDB image: (whether that image holds any key, the AOF after it).

    Only an image of auxiliary fields alone (what Redis 7 writes as the first base of an empty
    server) is read through; one holding keys returns (True, b"").
    """
    if not data.startswith(b"REDIS"):
        return False, data
    pos = 9  # "REDIS" + 4-digit version
    while pos < len(data):
        opcode = data[pos]
        if opcode == 0xFA:  # auxiliary field: name, value
            pos = _skip_rdb_string(data, _skip_rdb_string(data, pos + 1))
        elif opcode == 0xFF:  # end of file, then an 8-byte checksum
            return False, data[pos + 9:]
        else:
            return True, b""
    raise AofUnreadable("RDB image cut short")


def aof_files(redis_dir: Path) -> list[Path]:
    """The files to replay, oldest first: Redis 7's ``appendonlydir/`` (base, then incr files in
    order of the manifest) or Redis 6.2's single ``appendonly.aof``.

    Raises ``AofUnreadable`` when an AOF rewrite happened (a base of sequence > 1, or history
    files: the commands before the rewrite are gone) or there is no AOF.
    """
    directory = redis_dir / "appendonlydir"
    manifests = sorted(directory.glob("*.manifest")) if directory.is_dir() else []
    if manifests:
        entries = []
        for line in manifests[0].read_text().splitlines():
            fields = line.split()
            entry = dict(zip(fields[0::2], fields[1::2]))
            if "file" in entry:
                entries.append(entry)
        bases = [entry for entry in entries if entry.get("type") == "b"]
        if any(entry.get("type") == "h" for entry in entries) or any(entry["seq"] != "1" for entry in bases):
            raise AofUnreadable("an AOF rewrite happened: the commands before it are gone")
        increments = sorted((entry for entry in entries if entry.get("type") == "i"), key=lambda e: int(e["seq"]))
        return [directory / entry["file"].strip('"') for entry in bases + increments]
    single = redis_dir / "appendonly.aof"
    if single.exists():
        return [single]
    raise AofUnreadable(f"no append-only file under {redis_dir}")


def aof_commands(redis_dir: Path):
    """Every command of the AOF under ``redis_dir``, oldest first (see ``aof_files``).

    Raises ``AofUnreadable`` for an RDB base that holds keys, and for a single-file AOF that
    starts with an RDB preamble (Redis 6.2 writes one only when it rewrites the file).
    """
    for path in aof_files(redis_dir):
        data = path.read_bytes()
        has_keys, body = split_rdb_preamble(data)
        if has_keys or (data.startswith(b"REDIS") and ".base." not in path.name):
            raise AofUnreadable(f"{path.name} starts with an RDB image holding keys, or left by a rewrite: "
                                "the commands before it are gone")
        yield from iter_resp_commands(body)


def message_job_id(raw: bytes) -> str | None:
    """The job id of a kombu message as Redis holds it: the ``id`` header of its JSON envelope, or
    of the envelope first in an ``unacked`` entry (``[envelope, exchange, routing key]``)."""
    try:
        envelope = json.loads(raw)
        if isinstance(envelope, list) and envelope:
            envelope = envelope[0]
        job_id = envelope["headers"]["id"]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return job_id if isinstance(job_id, str) else None


class ListReplay:
    """Replays an AOF's list commands and ``HSET unacked`` records, keeping each job's history:
    ``(command number, "push" | "pop" | "removed" | "recorded", key)`` in AOF order."""

    def __init__(self) -> None:
        self.db = b"0"
        self.lists: dict[tuple[bytes, bytes], deque[tuple[bytes, str | None]]] = {}
        self.history: dict[str, list[tuple[int, str, str]]] = {}
        self.number = 0
        self.handlers = {b"LPUSH": self._lpush, b"RPUSH": self._rpush, b"LPUSHX": self._lpushx,
                         b"RPUSHX": self._rpushx, b"LPOP": self._lpop, b"RPOP": self._rpop,
                         b"LMOVE": self._lmove, b"RPOPLPUSH": self._rpoplpush, b"LREM": self._lrem,
                         b"LTRIM": self._ltrim, b"DEL": self._delete, b"UNLINK": self._delete,
                         b"FLUSHDB": self._flushdb, b"FLUSHALL": self._flushall, b"SELECT": self._select,
                         b"HSET": self._hset, b"HMSET": self._hset, b"HSETNX": self._hset}

    def replay(self, commands) -> "ListReplay":
        """Apply every command (numbered from 1 in AOF order); a MULTI block applies at its EXEC and
        not at all if the AOF ends before (Redis too drops it when loading). Returns self."""
        pending = None
        for number, command in enumerate(commands, 1):
            name = command[0].upper()
            if name == b"MULTI":
                pending = []
            elif name == b"EXEC" and pending is not None:
                for queued in pending:
                    self._apply(*queued)
                pending = None
            elif pending is not None:
                pending.append((number, command))
            else:
                self._apply(number, command)
        return self

    def _apply(self, number: int, command: list[bytes]) -> None:
        self.number = number
        name = command[0].upper()
        key = command[1] if len(command) > 1 else b""
        if name in _UNFOLLOWED and (name == b"SWAPDB" or (self.db, key) in self.lists):
            raise AofUnreadable(f"command {number} ({name.decode()}) changes a list in a way not replayed")
        handler = self.handlers.get(name)
        if handler is not None:
            handler(*command[1:])

    def _note(self, job_id: str | None, what: str, key: bytes) -> None:
        if job_id is not None:
            self.history.setdefault(job_id, []).append((self.number, what, ascii(key)[2:-1]))

    def _push(self, key: bytes, values, left: bool) -> None:
        items = self.lists.setdefault((self.db, key), deque())
        for value in values:
            item = (value, message_job_id(value))
            if left:
                items.appendleft(item)
            else:
                items.append(item)
            self._note(item[1], "push", key)

    def _pop(self, key: bytes, count: int, left: bool) -> list[tuple[bytes, str | None]]:
        items = self.lists.get((self.db, key), deque())
        popped = [items.popleft() if left else items.pop() for _ in range(min(count, len(items)))]
        for _, job_id in popped:
            self._note(job_id, "pop", key)
        if not items:
            self.lists.pop((self.db, key), None)
        return popped

    def _remove_where(self, key: bytes, keep) -> None:
        items = self.lists.get((self.db, key), deque())
        kept = deque()
        for position, item in enumerate(items):
            if keep(position, item):
                kept.append(item)
            else:
                self._note(item[1], "removed", key)
        if kept:
            self.lists[(self.db, key)] = kept
        else:
            self.lists.pop((self.db, key), None)

    def _lpush(self, key, *values):
        self._push(key, values, left=True)

    def _rpush(self, key, *values):
        self._push(key, values, left=False)

    def _lpushx(self, key, *values):
        if (self.db, key) in self.lists:
            self._push(key, values, left=True)

    def _rpushx(self, key, *values):
        if (self.db, key) in self.lists:
            self._push(key, values, left=False)

    def _lpop(self, key, count=b"1"):
        self._pop(key, int(count), left=True)

    def _rpop(self, key, count=b"1"):
        self._pop(key, int(count), left=False)

    def _lmove(self, source, destination, where_from, where_to):
        for value, _ in self._pop(source, 1, left=where_from.upper() == b"LEFT"):
            self._push(destination, [value], left=where_to.upper() == b"LEFT")

    def _rpoplpush(self, source, destination):
        self._lmove(source, destination, b"RIGHT", b"LEFT")

    def _lrem(self, key, count, value):
        """LREM: up to ``count`` (0: all) items equal to ``value``, from the head (count < 0: tail)."""
        count = int(count)
        items = list(self.lists.get((self.db, key), ()))
        positions = [i for i, (item, _) in enumerate(items) if item == value]
        if count < 0:
            positions = positions[::-1]
        doomed = set(positions[:abs(count)] if count else positions)
        self._remove_where(key, lambda position, item: position not in doomed)

    def _ltrim(self, key, start, stop):
        """LTRIM with Redis' index rules (negative from the end, ``stop`` inclusive)."""
        size = len(self.lists.get((self.db, key), ()))
        first = max(0, int(start) + size if int(start) < 0 else int(start))
        last = min(size - 1, int(stop) + size if int(stop) < 0 else int(stop))
        self._remove_where(key, lambda position, item: first <= position <= last)

    def _delete(self, *keys):
        for key in keys:
            self._remove_where(key, lambda position, item: False)

    def _flushdb(self, *options):
        for db, key in [k for k in self.lists if k[0] == self.db]:
            self._delete(key)

    def _flushall(self, *options):
        current = self.db
        for db in {k[0] for k in self.lists}:
            self.db = db
            self._flushdb()
        self.db = current

    def _select(self, db):
        self.db = db

    def _hset(self, key, *fields_and_values):
        if key == UNACKED_KEY:
            for value in fields_and_values[1::2]:
                self._note(message_job_id(value), "recorded", key)


def classify_loss(history: list[tuple[int, str, str]]) -> str:
    """Where a lost job's message went, from its AOF history (see ``ListReplay``).

    ``never_enqueued``: never pushed onto a list. ``popped_never_recorded``: its last pop was
    followed by neither a record in ``unacked`` nor another push: Redis handed it to a worker that
    never recorded it. ``other``: anything else (still queued, recorded and never acked, ...).
    """
    if not any(what == "push" for _, what, _ in history):
        return NEVER_ENQUEUED
    pops = [position for position, (_, what, _) in enumerate(history) if what == "pop"]
    if pops and not any(what in ("push", "recorded") for _, what, _ in history[pops[-1] + 1:]):
        return IN_DELIVERY
    return OTHER


def describe_history(history: list[tuple[int, str, str]], limit: int = 8) -> str:
    """A short account of a job's AOF history: ``push@120 fleet.embed.minilm, pop@121 ...``."""
    shown = [f"{what}@{number} {key}" for number, what, key in history[-limit:]]
    return ("... " if len(history) > limit else "") + ", ".join(shown)


def where_lost(redis_dir: Path, job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """For each lost job id: (``classify_loss`` verdict, or ``unknown``; its history or the reason
    the AOF cannot tell), from the AOF under ``redis_dir``."""
    if not job_ids:
        return {}
    try:
        replay = ListReplay().replay(aof_commands(redis_dir))
    except (AofUnreadable, OSError, ValueError, IndexError) as exc:
        return {job_id: (UNKNOWN, str(exc)) for job_id in job_ids}
    return {job_id: (classify_loss(replay.history.get(job_id, [])),
                     describe_history(replay.history.get(job_id, [])) or "not in the AOF")
            for job_id in job_ids}


# --- main -----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="fleet-chaos-"))
    (workdir / "redis").mkdir()
    registry = Path(args.registry) if args.registry else None
    if registry is None:
        from workers.serving.models.demo_models import init_demo

        models_dir = Path(args.models_dir)
        registry = models_dir / "registry.toml"
        if not registry.exists():
            print(f"writing demo models to {models_dir} ...", flush=True)
            registry = init_demo(models_dir)
    env = {"FLEET_VISIBILITY_TIMEOUT_S": str(args.visibility_timeout), "FLEET_CONCURRENCY": str(args.concurrency),
           "FLEET_TORCH_THREADS": "1", "FLEET_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1",
           "FLEET_DRAIN_GRACE_S": "30", "FLEET_SWEEP_INTERVAL_S": str(args.sweep_interval),
           "FLEET_SWEEP_GRACE_S": str(args.sweep_grace)}
    if args.max_attempts:
        env["FLEET_MAX_ATTEMPTS"] = str(args.max_attempts)
    redis_args = ["--auto-aof-rewrite-percentage", "0"] if args.no_aof_rewrite else []
    fleet = Fleet(workdir, registry, args.workers, env, args.redis_signal, redis_args)
    # Workers are killed on purpose: jobs submitted while none is live must queue, not be refused.
    settings = FleetSettings(redis_url="redis://127.0.0.1:1/0", visibility_timeout_s=args.visibility_timeout,
                             wait_for_worker=True)
    report: dict[str, Any] = {}
    try:
        fleet.start_redis()
        settings = settings.model_copy(update={"redis_url": fleet.url})
        names = [fleet.start_worker() for _ in range(args.workers)]
        fleet.wait_ready(names)
        fleet.note(f"{args.workers} workers ready; Redis {fleet.url} (AOF everysec), visibility timeout "
                   f"{args.visibility_timeout} s")
        jobs = make_jobs(args.jobs, rng)
        submitter = Submitter(fleet, jobs, args.rate, settings)
        window_s = args.jobs / args.rate
        events = sorted([(rng.uniform(0.05, 0.95) * window_s, "kill") for _ in range(args.kills)]
                        + [(rng.uniform(0.2, 0.8) * window_s, "redis") for _ in range(args.redis_restarts)])
        started = time.monotonic()
        submitter.start()
        redis_index = 0
        for at, what in events:
            time.sleep(max(0.0, started + at - time.monotonic()))
            if what == "kill":
                fleet.kill_random_worker(rng)
            else:
                fleet.restart_redis(redis_index)
                redis_index += 1
        submitter.join()
        fleet.note(f"submitted {len(submitter.submitted)} jobs in {time.monotonic() - started:.1f} s; "
                   f"submission errors retried: {dict(submitter.submit_errors)}")
        client = redis.Redis.from_url(fleet.url)
        metas = collect_results(client, submitter.submitted, args.settle_timeout, fleet)
        elapsed = time.monotonic() - started
        fleet.note(f"results collected after {elapsed:.1f} s; checking against the in-process reference")
        reference = Reference(registry)
        verdicts = {job.id: check(job, metas.get(job.id), reference) for job in submitter.submitted}
        outcomes = Counter(verdicts.values())
        lost_where = where_lost(fleet.workdir / "redis", [job_id for job_id, v in verdicts.items() if v == "lost"])
        problems: list[str] = []
        for job in submitter.submitted:
            outcome = verdicts[job.id]
            if outcome in ("completed", "failed_as_expected") or len(problems) >= 20:
                continue
            if outcome == "lost":
                outcome = (f"lost ({lost_where[job.id][0]}; submitted at {job.submitted_at:.1f} s; "
                           f"AOF: {lost_where[job.id][1]})")
            problems.append(f"{outcome}: {job.kind} {job.id} {json.dumps(job.request)[:120]} "
                            f"-> {json.dumps(metas.get(job.id))[:300]}")
        runs = completed_runs(workdir)
        submitted_ids = {job.id for job in submitter.submitted}
        result_keys = Counter()
        orphans = 0
        for key in client.scan_iter(match="celery-task-meta-*", count=1000):
            job_id = key.decode()[len("celery-task-meta-"):]
            result_keys[job_id] += 1
            orphans += job_id not in submitted_ids
        attempts = {}
        for start in range(0, len(submitter.submitted), 1000):
            chunk = [job.id for job in submitter.submitted[start:start + 1000]]
            for job_id, value in zip(chunk, client.mget([keys.attempts(j) for j in chunk])):
                if value is not None:
                    attempts[job_id] = int(value)
        dead_letters = client.hlen(keys.DEAD_LETTERS)
        client.close()
        computed_twice = sum(1 for job in submitter.submitted if len(runs.get(job.id, ())) >= 2)
        stored_twice = sum(1 for job in submitter.submitted if stored_more_than_once(runs.get(job.id, [])))
        report = {
            "jobs_requested": args.jobs, "workers": args.workers, "kills": args.kills,
            "redis_restarts": args.redis_restarts, "seed": args.seed, "visibility_timeout_s": args.visibility_timeout,
            "submitted": len(submitter.submitted),
            "submitted_by_kind": dict(Counter(job.kind for job in submitter.submitted)),
            "completed": outcomes["completed"], "failed_as_expected": outcomes["failed_as_expected"],
            "lost": outcomes["lost"],
            "lost_via_client": sum(1 for job in submitter.submitted
                                   if job.id in lost_where and job.kind != "invalid"),
            "resent_after_loss": resent_after_loss(workdir),
            "lost_in_delivery": sum(where == IN_DELIVERY for where, _ in lost_where.values()),
            "lost_other": sum(where != IN_DELIVERY for where, _ in lost_where.values()),
            "workers_sigkilled": fleet.kills_done, "wrong": outcomes["wrong"],
            "failed_unexpectedly": outcomes["failed_unexpectedly"], "dead_lettered": outcomes["dead_lettered"],
            "duplicated": sum(1 for count in result_keys.values() if count > 1),
            "computed_twice": computed_twice, "stored_twice": stored_twice,
            "redelivered": sum(1 for count in attempts.values() if count > 1),
            "orphan_results": orphans, "dlq_entries": dead_letters,
            "submission_errors_retried": dict(submitter.submit_errors),
            "elapsed_s": round(elapsed, 1), "events": fleet.events, "problems": problems,
            "lost_where": {job_id: where for job_id, (where, _) in lost_where.items()},
            "workdir": str(workdir),
        }
        return report
    finally:
        fleet.stop()
        if not args.keep and report and not report_failed(report) and not report.get("lost"):
            shutil.rmtree(workdir, ignore_errors=True)


def report_failed(report: dict[str, Any]) -> bool:
    """Whether a run broke a promise: any wrong, failed unexpectedly, dead-lettered or duplicated job,
    any job submitted through FleetClient lost (the delivery sweeper re-sends those), any job lost other than in delivery to a worker that was then SIGKILLed, or more jobs lost in
    delivery than workers were SIGKILLed (a worker has one consumer connection: one BRPOP reply in
    flight at a time, so a kill can take at most one unrecorded message with it)."""
    if any(report.get(name) for name in ("wrong", "failed_unexpectedly", "dead_lettered", "duplicated",
                                         "lost_via_client")):
        return True
    if report.get("lost_other", report.get("lost")):
        return True
    return report.get("lost_in_delivery", 0) > report.get("workers_sigkilled", report.get("kills", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=3, help="worker SIGKILLs (each followed by a restart)")
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", type=float, default=40.0, help="submissions per second")
    parser.add_argument("--concurrency", type=int, default=16, help="task threads per worker")
    parser.add_argument("--visibility-timeout", type=int, default=10)
    parser.add_argument("--sweep-interval", type=float, default=2.0,
                        help="FLEET_SWEEP_INTERVAL_S for workers: seconds between delivery sweeps")
    parser.add_argument("--sweep-grace", type=float, default=5.0,
                        help="FLEET_SWEEP_GRACE_S for workers: a job's age before a sweep examines it")
    parser.add_argument("--max-attempts", type=int, default=0, help="FLEET_MAX_ATTEMPTS for workers (0: default)")
    parser.add_argument("--redis-signal", choices=["term", "kill", "alternate"], default="alternate")
    parser.add_argument("--settle-timeout", type=float, default=90.0,
                        help="give up waiting when no job finished for this many seconds")
    parser.add_argument("--registry", default=None, help="a demo registry to reuse (default: --models-dir)")
    parser.add_argument("--models-dir", default=str(REPO_ROOT / "var" / "chaos-models"))
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, AOF); kept anyway when a run fails or loses a job")
    parser.add_argument("--no-aof-rewrite", action="store_true",
                        help="turn Redis' automatic AOF rewrite off, so that the AOF keeps every command and can "
                             "tell where lost jobs were lost (a rewrite, due after ~64 MB, about 4,000 jobs, "
                             "makes that 'unknown')")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    width = max(len(name) for name in report)
    for name, value in report.items():
        if name in ("events", "problems", "lost_where"):
            continue
        print(f"{name:<{width}}  {value}")
    for problem in report["problems"]:
        print("PROBLEM", problem)
    failed = report_failed(report)
    print("CHAOS", "FAILED" if failed else "PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
