"""ONNX Runtime against PyTorch for all-MiniLM-L6-v2 on this machine, side by side in one run.

    .venv/bin/python -m bench.onnx --out bench/results/onnx-cpu.json     # about 5 minutes
    .venv/bin/python -m bench.onnx --quick                                # smoke run, not for reporting

In one run, with a private redis-server:

1. **export**: ``fleet models export minilm`` twice, fp32 and ``--quantize int8`` (each checked
   against PyTorch by the export itself), and a registry serving ``minilm`` (PyTorch),
   ``minilm-onnx`` (ONNX Runtime, fp32) and ``minilm-int8`` (ONNX Runtime, int8);
2. **raw**: per backend, ``bench.raw`` in a child process (Fleet's own model class, the code the
   worker runs): ``embed([text])`` one at a time (batch 1) and texts/s at batch 32;
3. **agreement**: per backend, cosine of its normalised vectors to sentence-transformers' for
   the same sentences (a child process);
4. **fleet**: per backend, a real ``fleet worker`` (one at a time), one job at a time
   (``single``) then saturated single-sentence jobs (closed loop).

Every system runs with the same torch/ONNX Runtime thread count and ``OMP_WAIT_POLICY`` (``cpu``
profile of ``bench.run``). It prints the table, the ONNX Runtime / PyTorch ratios, the issue's
targets (ONNX Runtime fp32 >= 1.3x PyTorch's Fleet throughput with cosine >= 0.9999 to
sentence-transformers; int8 >= 2x with cosine >= 0.99) and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.run import (
    REPO,
    Profile,
    child_env,
    corpus_sentences,
    cpu_profile,
    finish_report,
    format_table,
    format_targets,
    machine_info,
    run_raw,
    run_system,
    target,
)

#: backend name -> (registry model, export quantization or None for the PyTorch model itself).
BACKENDS = {"torch": ("minilm", None), "onnx-fp32": ("minilm-onnx", "fp32"), "onnx-int8": ("minilm-int8", "int8")}
AGREEMENT_PREFIX = "BENCH-AGREEMENT "


def export_minilm(workdir: Path, redis_url: str, profile: Profile) -> tuple[Path, dict[str, str]]:
    """Export minilm (fp32 and int8) with the real command; write the registry; return it and refusals."""
    from workers.serving.registry import load_registry
    from workers.settings import WorkerSettings

    base = load_registry(WorkerSettings().model_registry)["minilm"]
    limits = (f"max_batch_size = {base.max_batch_size}\nmax_wait_ms = {base.max_wait_ms}\n"
              f"max_seq_len = {base.max_seq_len}\n")
    tables = [f'[models.minilm]\nkind = "embed"\nsource = "{base.source}"\n{limits}']
    refused: dict[str, str] = {}
    for backend, (model, precision) in BACKENDS.items():
        if precision is None:
            continue
        out = workdir / model
        args = [sys.executable, "-m", "workers.commands.cli", "models", "export", "minilm", "--format", "onnx",
                "--out", str(out)] + (["--quantize", "int8"] if precision == "int8" else [])
        done = subprocess.run(args, env=child_env(profile, redis_url), cwd=REPO, capture_output=True, text=True,
                              timeout=900)
        print(f"bench: export {backend}: {(done.stdout or done.stderr).strip().splitlines()[:3]}", flush=True)
        if done.returncode != 0:
            refused[backend] = done.stderr.strip()[-500:]
            continue
        tables.append(f'[models.{model}]\nkind = "embed"\nsource = "dir:{out}"\nbackend = "onnxruntime"\n{limits}')
    registry = workdir / "registry.toml"
    registry.write_text("\n".join(tables))
    return registry, refused


def measure_agreement(models: list[str], texts: list[str]) -> dict:
    """Child process: each model's normalised vectors against sentence-transformers' (cosine)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from workers.serving.models.loader import implementation_for
    from workers.serving.registry import load_registry, resolve_source
    from workers.settings import WorkerSettings

    registry = load_registry(WorkerSettings().model_registry)
    reference = SentenceTransformer(resolve_source(registry["minilm"])[0], device="cpu").encode(
        texts, normalize_embeddings=True, batch_size=32)
    out = {}
    for name in models:
        spec = registry[name]
        model = implementation_for(spec)(spec, "cpu")
        vectors = np.concatenate([np.array(model.embed(texts[i:i + 32])) for i in range(0, len(texts), 32)])
        cosines = (vectors * reference).sum(axis=1)
        out[name] = {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()), "texts": len(texts)}
    return out


def run_agreement(profile: Profile, redis_url: str, models: list[str], texts_file: Path) -> dict:
    args = [sys.executable, "-m", "bench.onnx", "agreement", "--models", ",".join(models), "--texts", str(texts_file)]
    done = subprocess.run(args, env=child_env(profile, redis_url), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith(AGREEMENT_PREFIX):
            return json.loads(line[len(AGREEMENT_PREFIX):])
    raise RuntimeError(f"agreement failed ({done.returncode}):\n{done.stderr[-3000:]}")


def evaluate(raw: dict, fleet: dict, agreement: dict) -> tuple[list[dict], dict]:
    """The issue's targets and the ONNX Runtime / PyTorch ratios (raw batch 1, raw batch 32, Fleet)."""
    ratios, targets = {}, []
    torch_model = BACKENDS["torch"][0]
    for backend, goal_speed, goal_cosine, cosine_kind in (("onnx-fp32", 1.3, 0.9999, "min_cosine"),
                                                            ("onnx-int8", 2.0, 0.99, "mean_cosine")):
        model = BACKENDS[backend][0]
        if model not in raw:
            targets.append(target(f"{backend}: Fleet saturated / torch Fleet saturated", None, goal_speed, ">=", "x",
                                  "export refused"))
            continue
        ratios[backend] = {
            "raw_batch1": raw[model]["batch1"]["texts_s"] / raw[torch_model]["batch1"]["texts_s"],
            "raw_batch32": (raw[model]["batches"]["32"]["e2e_texts_s"]
                            / raw[torch_model]["batches"]["32"]["e2e_texts_s"]),
            "fleet_saturated": (fleet[model].throughput_jobs_s / fleet[torch_model].throughput_jobs_s
                                if model in fleet and torch_model in fleet else None),
        }
        targets.append(target(f"{backend}: Fleet saturated / torch Fleet saturated", ratios[backend]["fleet_saturated"],
                              goal_speed, ">=", "x"))
        targets.append(target(f"{backend}: {cosine_kind.replace('_', ' ')} to sentence-transformers",
                              agreement[model][cosine_kind], goal_cosine, ">=", ""))
    return targets, ratios


def raw_rows(backend: str, raw: dict) -> list[dict]:
    batch1, batch32 = raw["batch1"], raw["batches"]["32"]
    return [{"system": f"raw {backend}", "load": "batch 1 (embed one text)", "jobs": batch1["n"],
             "throughput_jobs_s": batch1["texts_s"], "throughput_texts_s": batch1["texts_s"],
             "p50_ms": batch1["p50_ms"], "p90_ms": batch1["p90_ms"], "p99_ms": batch1["p99_ms"], "mean_batch": 1},
            {"system": f"raw {backend}", "load": "batch 32 (embed)", "jobs": None, "throughput_jobs_s": None,
             "throughput_texts_s": batch32["e2e_texts_s"], "mean_batch": 32}]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agreement"]:
        parser = argparse.ArgumentParser(prog="python -m bench.onnx agreement")
        parser.add_argument("--models", required=True)
        parser.add_argument("--texts", required=True)
        args = parser.parse_args(argv[1:])
        texts = json.loads(Path(args.texts).read_text())
        sys.stdout.write(AGREEMENT_PREFIX + json.dumps(measure_agreement(args.models.split(","), texts)) + "\n")
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="tiny phases: a smoke run, not for reporting")
    args = parser.parse_args(argv)

    from workers.process.embedded_redis import RedisServer

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fleet-bench-onnx-"))
    base = cpu_profile(args.quick)
    base = dataclasses.replace(base, raw_batches=[32], raw_single_n=20 if args.quick else 100,
                               raw_sweep_texts=64 if args.quick else 256, single_jobs=10 if args.quick else 60,
                               saturation_s=3 if args.quick else 15, warmup_s=1 if args.quick else 2, rates=[])
    texts = corpus_sentences(512)
    texts_file = workdir / "texts.json"
    texts_file.write_text(json.dumps(texts))
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m bench.onnx " + " ".join(argv), "load_average_at_start": os.getloadavg(),
            "machine": machine_info(), "quick": args.quick}
    print(f"bench.onnx: {meta['date']} {meta['machine'].get('cpu_model')} x{meta['machine']['cpu_count']}, "
          f"commit {meta['machine'].get('commit')}", flush=True)
    server = RedisServer(extra_args=["--client-output-buffer-limit", "pubsub", "0", "0", "0"]).start()
    report: dict = {"meta": meta, "raw": {}, "fleet": {}}
    fleet_phases: dict = {}
    rows: list[dict] = []
    try:
        registry, refused = export_minilm(workdir, server.url, base)
        report["export_refused"] = refused
        models = [model for backend, (model, _) in BACKENDS.items() if backend not in refused]
        env = {**base.env, "FLEET_MODEL_REGISTRY": str(registry)}
        profiles = {model: dataclasses.replace(base, model=model, env=env) for model in models}
        for backend, (model, _) in BACKENDS.items():
            if model in profiles:
                report["raw"][model] = run_raw(profiles[model], server.url, texts_file, workdir)
                rows += raw_rows(backend, report["raw"][model])
                print(f"bench.onnx: raw {backend} done", flush=True)
        agreement_texts = workdir / "agreement.json"
        agreement_texts.write_text(json.dumps(texts[:64 if args.quick else 512]))
        report["agreement"] = run_agreement(profiles[models[0]], server.url, models, agreement_texts)
        for backend, (model, _) in BACKENDS.items():
            if model not in profiles:
                continue
            # A deadline already past: run_system measures the single and saturated phases only.
            phases, info = run_system("fleet", profiles[model], server.url, workdir, texts, deadline=0)
            for phase in phases:
                phase.system = f"fleet {backend}"
            fleet_phases[model] = next(p for p in phases if p.load.startswith("saturated"))
            report["fleet"][model] = {"phases": [p.to_dict() for p in phases], "batcher": info.get("batcher"),
                                      "bad_results": info.get("bad_results")}
            rows += [p.to_dict() for p in phases]
            print(f"bench.onnx: fleet {backend} done", flush=True)
    finally:
        server.stop()
    targets, ratios = evaluate(report["raw"], fleet_phases, report["agreement"])
    report.update(targets=targets, ratios=ratios, table=format_table(rows), elapsed_s=time.monotonic() - began)
    report["meta"]["load_average_at_end"] = os.getloadavg()
    print()
    print(report["table"])
    print("\nONNX Runtime / PyTorch throughput:")
    for backend, entry in ratios.items():
        print(f"  {backend}: " + ", ".join(f"{k} {v:.2f}x" for k, v in entry.items() if v is not None))
    print("\ncosine to sentence-transformers:")
    for model, entry in report["agreement"].items():
        print(f"  {model}: min {entry['min_cosine']:.6f}, mean {entry['mean_cosine']:.6f} over {entry['texts']} texts")
    print("\ntargets:")
    print(format_targets(targets))
    for backend, reason in report["export_refused"].items():
        print(f"export {backend} REFUSED: {reason}")
    for model, entry in report["fleet"].items():
        if entry["bad_results"]:
            print(f"fleet {model}: BAD RESULTS {entry['bad_results']}")
    finish_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
