"""An embed job's latency on a worker that also serves generation, idle and with generate jobs queued.

    .venv/bin/python -m bench.embed_beside_generation [--generate-jobs 40] [--embeds 30]

Issue 14's target: on this machine, an embed job on a worker with 40 generate jobs queued is
served within 2x of its idle latency (before continuous batching: 0.47 s against 21 ms). On a
private redis-server it writes the demo models (``fleet models init-demo``), starts one
``fleet worker --device cpu --models minilm,tiny-llama`` (as a user does, registry defaults),
and measures ``--embeds`` one-sentence embed jobs one after the other: first with nothing else
queued, then right after ``--generate-jobs`` generate jobs of ``--new-tokens`` tokens were
submitted (they decode while the embeds run). Reports the p50 and p90 of each, from submission
to result, and their ratio.

Prints one JSON document (``--out`` writes it too). No test asserts these figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.job_cost import SENTENCE, print_report
from bench.private_fleet import worker_on_private_redis
from bench.provenance import commit
from producer import FleetClient
from workers.serving.models.demo_models import init_demo


def embed_latencies_ms(fleet: FleetClient, count: int) -> list[float]:
    """``count`` one-sentence embed jobs, one after the other: submission-to-result times in ms."""
    latencies = []
    for index in range(count):
        started = time.perf_counter()
        fleet.embed([f"{SENTENCE} ({index})"], model="minilm").result(timeout=120)
        latencies.append(1000 * (time.perf_counter() - started))
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50_ms": round(statistics.median(ordered), 2), "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embed_beside_generation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--generate-jobs", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--embeds", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="fleet-embed-beside-"))
    registry = init_demo(workdir / "models")
    report: dict = {"command": "python -m bench.embed_beside_generation "
                    + " ".join(argv if argv is not None else sys.argv[1:]),
                    "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with worker_on_private_redis("--device", "cpu", "--models", "minilm,tiny-llama", "--registry", str(registry),
                                 name="bench-embed-beside") as url, FleetClient(url) as fleet:
        fleet.embed([SENTENCE], model="minilm").result(timeout=60)  # first-call costs, outside the figures
        fleet.generate("Warm up", model="tiny-llama", max_new_tokens=8).result(timeout=60)
        report["idle"] = summary(embed_latencies_ms(fleet, args.embeds))
        generating = [fleet.generate(f"Once upon a time {i}", model="tiny-llama", max_new_tokens=args.new_tokens)
                      for i in range(args.generate_jobs)]
        beside = embed_latencies_ms(fleet, args.embeds)
        report["with_generate_jobs_queued"] = {**summary(beside), "generate_jobs": args.generate_jobs,
                                               "generate_jobs_finished_meanwhile":
                                                   sum(handle.status().finished for handle in generating)}
        report["p50_ratio"] = round(report["with_generate_jobs_queued"]["p50_ms"] / report["idle"]["p50_ms"], 2)
        for handle in generating:
            handle.cancel()
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
