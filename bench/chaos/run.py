"""``python -m bench.chaos``: one chaos run from the command line to its report (see ``bench/chaos/__init__.py``).

Exit status 1 if the run broke a promise (``report_failed``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench.chaos import __doc__ as chaos_doc
from bench.chaos.aof import IN_DELIVERY, where_lost
from bench.chaos.checks import (
    Reference,
    check,
    collect_results,
    completed_runs,
    resent_after_loss,
    stored_more_than_once,
)
from bench.chaos.fleet import REPO_ROOT, Fleet
from bench.chaos.workload import Submitter, make_jobs
from producer import keys
from producer.settings import FleetSettings


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
    fleet = Fleet(workdir, registry, args.workers, env, args.redis_signal, redis_args, consumers=args.consumers,
                  kill_targets=tuple(args.kill))
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
        submitter = Submitter(jobs, args.rate, settings, clock_start=fleet.t0)
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
        metas = collect_results(client, submitter.submitted, args.settle_timeout, fleet.note)
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
        result_keys: Counter[str] = Counter()
        orphans = 0
        for key in client.scan_iter(match="celery-task-meta-*", count=1000):
            job_id = key.decode()[len("celery-task-meta-"):]
            result_keys[job_id] += 1
            orphans += job_id not in submitted_ids
        crash_charges = {}
        for start in range(0, len(submitter.submitted), 1000):
            chunk = [job.id for job in submitter.submitted[start:start + 1000]]
            with client.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hget(keys.crash_record(job_id), "charges")
                values = pipe.execute()
            for job_id, value in zip(chunk, values):
                if value is not None:
                    crash_charges[job_id] = int(value)
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
            "workers_sigkilled": fleet.kills_done, "kills_by_target": fleet.kills_by_target,
            "consumers_killed": fleet.kills_by_target.get("consumer", 0) + args.consumers * (
                fleet.kills_by_target.get("worker", 0) + fleet.kills_by_target.get("device", 0)),
            "consumers_per_worker": args.consumers, "wrong": outcomes["wrong"],
            "failed_unexpectedly": outcomes["failed_unexpectedly"], "dead_lettered": outcomes["dead_lettered"],
            "duplicated": sum(1 for count in result_keys.values() if count > 1),
            "computed_twice": computed_twice, "stored_twice": stored_twice,
            "crash_charged": sum(1 for count in crash_charges.values() if count > 0),
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
    any job submitted through FleetClient lost (the delivery sweeper re-sends those), any job lost
    other than in delivery to a worker that was then SIGKILLed, or more jobs lost in
    delivery than consumer processes died (each consumer has one BRPOP reply in flight at a time,
    so its death can take at most one unrecorded message with it; a worker kill takes all its
    consumers, and a device kill stops them, within the drain grace)."""
    if any(report.get(name) for name in ("wrong", "failed_unexpectedly", "dead_lettered", "duplicated",
                                         "lost_via_client")):
        return True
    if report.get("lost_other", report.get("lost")):
        return True
    exposed = report.get("consumers_killed", report.get("workers_sigkilled", report.get("kills", 0)))
    return report.get("lost_in_delivery", 0) > exposed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=chaos_doc.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=3, help="worker SIGKILLs (each followed by a restart)")
    parser.add_argument("--redis-restarts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--consumers", type=int, default=1, help="fleet worker --consumers for every worker")
    parser.add_argument("--kill", type=lambda text: [t for t in text.split(",") if t], default=["worker"],
                        help="what the kills hit, in turn: worker (the whole group), consumer (one consumer "
                             "process), device (the device process); comma-separated")
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


