"""The raw model in-process: what the device does with no queue, no Celery and no Redis.

Run by ``bench.run`` and ``bench.onnx`` in a child process (so its threads and device memory
are gone before the workers start); prints one JSON object. Uses Fleet's own embedder class for
the registry entry the worker loads (``Embedder``, or ``OnnxEmbedder`` for the onnxruntime
backend), so "raw" and "Fleet" run the same forward code:

* ``batch1``: ``embed([text])`` per text, one after another (tokenise, forward, pool,
  normalise, convert to lists): latency percentiles and throughput.
* ``compute1``: the forward step alone for one pre-tokenised input (``run_batch``; on CUDA
  it ends with the copy to the host, so it is synchronised): the "single-item compute".
  On CUDA also ``compute1_eager``, the same without CUDA graphs.
* ``batches``: for each batch size, texts/s of ``embed`` over many texts (``e2e``) and of the
  forward step alone on pre-tokenised inputs plus normalisation (``forward``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _timed(fn, repeat: int, max_s: float) -> list[float]:
    """Time ``fn`` ``repeat`` times, or fewer (at least 5) if ``max_s`` seconds run out first."""
    times: list[float] = []
    spent_until = time.perf_counter() + max_s
    for index in range(repeat):
        start = time.perf_counter()
        fn(index)
        times.append(time.perf_counter() - start)
        if len(times) >= 5 and start > spent_until:
            break
    return times


def _summary(seconds: list[float]) -> dict:
    from bench.loadgen import percentile

    def ms(q: float) -> float:
        value = percentile(seconds, q)
        assert value is not None, "seconds is not empty"
        return 1000 * value

    return {"n": len(seconds), "p50_ms": ms(50), "p90_ms": ms(90), "p99_ms": ms(99),
            "mean_ms": 1000 * sum(seconds) / len(seconds)}


def measure(device: str, model: str, texts: list[str], batch_sizes: list[int], single_n: int,
            sweep_texts: int, min_sweep_s: float, max_phase_s: float = 10.0) -> dict:
    import torch

    from workers.serving.models.embedder import finish_vectors
    from workers.serving.models.loader import implementation_for
    from workers.serving.registry import load_registry
    from workers.settings import WorkerSettings

    spec = load_registry(WorkerSettings().model_registry)[model]
    started = time.perf_counter()
    embedder = implementation_for(spec)(spec, device)
    embedder.warmup()
    out: dict = {"model": model, "device": device, "dtype": str(embedder.dtype).removeprefix("torch."),
                 "load_and_warmup_s": time.perf_counter() - started, "max_batch_size": spec.max_batch_size,
                 "max_seq_len": spec.max_seq_len}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
        report = embedder.graph_report
        out["graphs"] = {"enabled": report.enabled, "captured": report.captured, "capture_s": report.capture_s,
                         "error": report.error}

    singles = [texts[i % len(texts)] for i in range(single_n)]
    for text in singles[:5]:
        embedder.embed([text])
    latencies = _timed(lambda i: embedder.embed([singles[i]]), single_n, max_phase_s)
    out["batch1"] = {**_summary(latencies), "texts_s": len(latencies) / sum(latencies)}

    ids = embedder.encode_each(singles[:1])
    out["compute1"] = _summary(_timed(lambda i: embedder.run_batch(ids), single_n, max_phase_s))
    if device.startswith("cuda") and embedder._graphs:
        graphs, embedder._graphs = embedder._graphs, {}
        try:
            embedder.run_batch(ids)
            out["compute1_eager"] = _summary(_timed(lambda i: embedder.run_batch(ids), single_n, max_phase_s))
        finally:
            embedder._graphs = graphs

    out["batches"] = {}
    for size in batch_sizes:
        # One round: a few batches of this size; rounds repeat until min_sweep_s has passed.
        pool = [texts[i % len(texts)] for i in range(max(size * 2, min(sweep_texts, size * 4)))]
        tokenized = embedder.encode_each(pool)
        chunks = [pool[i:i + size] for i in range(0, len(pool), size)]
        id_chunks = [tokenized[i:i + size] for i in range(0, len(tokenized), size)]
        embedder.embed(chunks[0])

        def e2e(chunks=chunks):
            for chunk in chunks:
                embedder.embed(chunk)

        def forward(id_chunks=id_chunks):
            for chunk in id_chunks:
                finish_vectors(embedder.run_batch(chunk), True)

        entry = {}
        for name, fn in (("e2e", e2e), ("forward", forward)):
            rounds, spent = 0, 0.0
            while rounds < 1 or (spent < min_sweep_s and spent < max_phase_s):
                start = time.perf_counter()
                fn()
                spent += time.perf_counter() - start
                rounds += 1
            entry[f"{name}_texts_s"] = rounds * len(pool) / spent
        out["batches"][str(size)] = entry
    best = max(out["batches"].items(), key=lambda kv: kv[1]["e2e_texts_s"])
    out["best_batch"] = {"batch": int(best[0]), **best[1]}
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True, help="JSON file with a list of texts")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--single-n", type=int, default=100)
    parser.add_argument("--sweep-texts", type=int, default=256)
    parser.add_argument("--min-sweep-s", type=float, default=1.5)
    parser.add_argument("--max-phase-s", type=float, default=10.0, help="cap per measurement (busy machines)")
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    texts = json.loads(open(args.texts).read())
    result = measure(args.device, args.model, texts, [int(b) for b in args.batch_sizes.split(",")],
                     args.single_n, args.sweep_texts, args.min_sweep_s, args.max_phase_s)
    result["torch_threads"] = torch.get_num_threads()
    sys.stdout.write("BENCH-RAW " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
