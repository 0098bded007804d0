"""Training throughput by precision: the real training loop, fp32 against bf16, side by side.

    python3 -m bench.train_precision --device cuda --out train.json

For each kind (mlp, cnn, causal_lm) runs ``workers.training.loop.run_training`` twice on the
same device, seed and data, once in fp32 and once with bf16 autocast, and reports samples
per second (``samples / train_seconds``, whole epochs, evaluation included), milliseconds per
optimizer step, and the final held-out metric, so that a speed-up is read next to what it
costs in quality. One warm-up epoch per kind is run and thrown away first (CUDA context,
kernel selection). bf16 needs a GPU (or a CPU with bf16 support, slowly).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import torch

from producer.contract import TrainRequest
from workers.training.artifacts import LocalDirectoryStore
from workers.training.loop import run_training

#: Request fields per kind for the comparison: a batch large enough for the GPU to matter.
WORKLOADS = {
    "mlp": {"kind": "mlp", "epochs": 30, "batch_size": 256},
    "cnn": {"kind": "cnn", "epochs": 16, "batch_size": 256},
    "causal_lm": {"kind": "causal_lm", "epochs": 8, "batch_size": 16},
}
PRECISIONS = ("fp32", "bf16")
#: ``--kind-defaults``: each kind's default request, i.e. what ``fleet train KIND`` runs.
DEFAULT_WORKLOADS = {kind: {"kind": kind} for kind in WORKLOADS}


def run_one(fields: dict, precision: str, device: str, root: str, job_id: str) -> dict:
    """Train once; return throughput and quality figures of that run."""
    request = TrainRequest.model_validate({**fields, "precision": precision, "checkpoint_every_steps": 10**6})
    store = LocalDirectoryStore(root)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = run_training(request, device, store, job_id=job_id)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - started
    samples = result.steps * request.batch_size * request.grad_accum_steps
    quality = "accuracy" if "accuracy" in result.metrics else "val_loss"
    return {
        "precision": precision, "steps": result.steps, "batch_size": request.batch_size,
        "train_seconds": result.metrics["train_seconds"], "wall_s": wall_s,
        "samples_per_s": samples / result.metrics["train_seconds"],
        "ms_per_step": 1000.0 * result.metrics["train_seconds"] / result.steps,
        "quality_metric": quality, "quality": result.metrics[quality],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kinds", default=",".join(WORKLOADS), help="comma-separated subset of mlp,cnn,causal_lm")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp32,bf16")
    parser.add_argument("--kind-defaults", action="store_true",
                        help="train each kind with its default request (what `fleet train KIND` runs)")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = {"device": args.device, "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda")
              else platform.processor() or platform.machine(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kinds": {}}
    print(f"{'kind':<10} {'precision':<9} {'steps':>6} {'ms/step':>8} {'samples/s':>10} {'quality':>18} {'train':>9}")
    with tempfile.TemporaryDirectory(prefix="fleet-train-bench-") as root:
        for kind in args.kinds.split(","):
            fields = (DEFAULT_WORKLOADS if args.kind_defaults else WORKLOADS)[kind]
            run_one({**fields, "epochs": 1}, "fp32", args.device, root, f"warmup-{kind}")
            rows = [run_one(fields, precision, args.device, root, f"{kind}-{precision}")
                    for precision in args.precisions.split(",")]
            for row in rows:
                print(f"{kind:<10} {row['precision']:<9} {row['steps']:>6} {row['ms_per_step']:>8.2f} "
                      f"{row['samples_per_s']:>10.0f} "
                      f"{row['quality_metric'] + '=' + format(row['quality'], '.4f'):>18} "
                      f"{row['train_seconds']:>7.1f} s")
            report["kinds"][kind] = {"runs": rows}
            if len(rows) == 2:
                speedup = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
                print(f"{kind:<10} {rows[1]['precision']}/{rows[0]['precision']} throughput: {speedup:.2f}x")
                report["kinds"][kind]["speedup"] = speedup
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
