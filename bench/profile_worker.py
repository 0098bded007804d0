"""Where a saturated worker spends its time: py-spy samples of every process of one ``fleet worker``.

    python -m bench.profile_worker [--seconds 20] [--concurrency 64] [--repo DIR --module M]

Starts a private redis-server and one CPU worker serving ``minilm`` (``python -m <module> worker
--device cpu --models minilm``, run from ``--repo``: another checkout profiles older code the
same way), keeps ``--concurrency`` single-sentence embed jobs in flight (bench/loadgen.py), and
records ``py-spy record --subprocesses --nonblocking`` of the worker's process tree for
``--seconds`` s while that load runs. Prints, per process, the functions with the most samples
on CPU: *self* (the frame that was running) and *total* (anywhere on the stack), as a percent
of that process's samples, and the jobs/s the load saw. Needs ``py-spy`` on PATH (PyPI).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.loadgen import Load, ResultStream
from bench.provenance import commit
from producer import FleetClient, keys
from producer.contract import EmbedRequest, inference_queue
from producer.settings import FleetSettings
from workers.process.embedded_redis import RedisServer

REPO = Path(__file__).resolve().parent.parent
#: py-spy's label of a process in a stack (its command line may itself contain ";").
_PROCESS = re.compile(r'process (\d+):"([^"]*)";?')


def sentences(count: int) -> list[str]:
    text = (REPO / "workers/training/corpus/aesop.txt").read_text()
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 4 <= len(s.split()) <= 20]
    return (found * (count // len(found) + 1))[:count]


def role(command_line: str, pid: int, root: int) -> str:
    """A readable name for one process of the worker's tree."""
    if pid == root:
        return "launcher" if "spawn_main" not in command_line else "worker"
    if "spawn_main" in command_line or "multiprocessing" in command_line:
        return f"child {pid}"
    return f"pid {pid}"


def summarise(raw: str, root: int, top: int) -> dict[str, dict]:
    """Per process: sample count and the top self / total functions (``function (file:line)``)."""
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    samples: collections.Counter = collections.Counter()
    names: dict[str, str] = {}
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        process = "?"
        for found in _PROCESS.finditer(stack):  # a child's samples sit under its parents' labels: take the last
            process = found.group(1)
            names[process] = role(found.group(2), int(process), root)
        frames = [frame for frame in _PROCESS.sub("", stack).split(";") if frame and not frame.startswith("thread ")]
        if not frames:
            continue
        samples[process] += count
        own[process][frames[-1]] += count
        for frame in set(frames):
            total[process][frame] += count
    report = {}
    for process, count in samples.most_common():
        report[f"{names.get(process, process)} (pid {process})"] = {
            "samples": count,
            "self": [(frame, round(100 * n / count, 1)) for frame, n in own[process].most_common(top)],
            "total": [(frame, round(100 * n / count, 1)) for frame, n in total[process].most_common(top)
                      if "<module>" not in frame and "_bootstrap" not in frame][:top],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long py-spy samples")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs kept in flight")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose worker is profiled")
    parser.add_argument("--module", default="workers.commands.cli", help="its CLI module (run as -m MODULE worker)")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy is not on PATH: pip install py-spy", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="fleet-profile-"))
    server = RedisServer().start()
    env = {**os.environ, "REDIS_URL": server.url, "HF_HUB_OFFLINE": "1", "FLEET_LOG_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(args.repo), os.environ.get("PYTHONPATH")])),
           "FLEET_CONCURRENCY": str(args.concurrency)}
    log = (workdir / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", args.module, "worker", "--device", "cpu", "--models", "minilm"],
                              cwd=args.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    stream = ResultStream(server.url)
    stream.start()
    try:
        # The catalog entry the client needs before a worker announces it (an older worker may write none).
        redis.Redis.from_url(server.url).hset(keys.CATALOG, "minilm", json.dumps(
            {"kind": "embed", "queue": inference_queue("embed", "minilm")}))
        client = FleetClient(settings=FleetSettings(redis_url=server.url, wait_for_worker=True))
        requests = [EmbedRequest(texts=[text]) for text in sentences(4096)]
        client.embed(["warm up"]).result(timeout=300)  # the worker is up and has answered once
        load = Load("fleet", client, stream, requests)
        raw_path = workdir / "profile.txt"
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(worker.pid), "--subprocesses", "--nonblocking",
                                "--rate", str(args.rate), "--duration", str(int(args.seconds)), "--format", "raw",
                                "--output", str(raw_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        phase = load.closed(f"saturated (c={args.concurrency})", args.concurrency, duration_s=args.seconds,
                            warmup_s=0.5)
        spy.wait(args.seconds + 60)
        report: dict[str, Any] = {
                  "commit": commit() if args.repo == REPO else str(args.repo), "date": time.strftime("%Y-%m-%d"),
                  "jobs_per_s": round(phase.throughput_jobs_s, 1), "p50_ms": phase.p50_ms,
                  "processes": summarise(raw_path.read_text(), worker.pid, args.top)}
    finally:
        stream.stop()
        worker.terminate()
        try:
            worker.wait(90)
        except subprocess.TimeoutExpired:
            worker.kill()
        server.stop()
    print(f"{report['jobs_per_s']} jobs/s saturated (c={args.concurrency}) while sampled; commit {report['commit']}")
    for name, entry in report["processes"].items():
        print(f"\n== {name}: {entry['samples']} samples")
        print("  self %  function                                                 | total %  function")
        for (own, own_pct), (tot, tot_pct) in zip(entry["self"], entry["total"]):
            print(f"  {own_pct:5.1f}  {own[:58]:58s} | {tot_pct:5.1f}  {tot[:70]}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
