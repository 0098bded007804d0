"""Generation benchmark: the continuous-batching engine vs one sequence at a time vs transformers'
own ``generate_batch``, on the same prompts, in one process and one run.

    .venv/bin/python -m bench.generation --device cpu --out bench/results/generation-cpu.json
    python3 -m bench.generation --device cuda --out "$OUT/generation-gpu.json"   # the lent GPU machine

For each concurrency level N (cpu: 1 and 16; cuda: 1, 8, 32, 64 and 128), N jobs of exactly
``--new-tokens`` new tokens (128; end-of-sequence is off) are submitted at once, greedy, and
three systems run them (each twice; the first run, untimed, pays the first-call costs of the
new shapes):

* **engine**: Fleet's ``GenerationEngine`` with room for all N (``max_sequences = N``);
* **one_at_a_time**: the same engine with ``max_sequences = 1``, i.e. the old path (one
  generation per model at a time). Its tokens/s does not depend on N, so above
  ``--serial-cap`` jobs it runs only that many (its TTFT is then left out);
* **generate_batch**: ``model.generate_batch`` (transformers' continuous batching, paged
  attention) on the same token ids: the library's offline ceiling. Timed from the requests'
  creation to their last token (the library's warm-up, e.g. CUDA graph capture, is outside).

Reported per system and level: aggregate generated tokens/s, time to first token (p50, p99,
from submission), wall seconds. Profiles: ``cpu``, the demo's tiny Llama (``fleet models
init-demo``), fp32; ``cuda``, a ~1B-parameter Llama (hidden 2048, 16 layers, 32 heads,
intermediate 5632, vocab 32000) with random weights in bf16 and a word-level tokenizer over
that vocabulary. Imports only torch, transformers and tokenizers besides the engine (no Celery,
Redis or pydantic), so it runs on a machine that has nothing else; the cpu profile also needs
the project's training code to build the demo model.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from bench import provenance
from workers.serving.generation.engine import GenerationEngine
from workers.serving.generation.hooks import percentiles
from workers.serving.generation.limits import EngineLimits
from workers.serving.generation.sampling import Sampling

REPO = Path(__file__).resolve().parent.parent

#: The ~1B Llama of the cuda profile (about 0.95e9 parameters).
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)


@dataclass
class Measurement:
    system: str
    concurrency: int
    jobs: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose tokens are the words ``w0 .. w<vocab_size - 1>`` (``w0`` is pad
    and unknown): a real tokenizer over the random model's whole vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def random_llama_1b(device: str):
    """The cuda profile's model: random weights, bf16, built on the device; and its tokenizer."""
    config = LlamaConfig(**LLAMA_1B)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval(), word_tokenizer(config.vocab_size)


def demo_tiny_llama(directory: Path):
    """The cpu profile's model: the demo's tiny Llama (random weights, its fable tokenizer), fp32."""
    from workers.serving.models.demo_models import write_tiny_llama

    write_tiny_llama(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    return model, transformers.AutoTokenizer.from_pretrained(directory)


def make_prompts(tokenizer, jobs: int, seed: int = 0) -> list[str]:
    """``jobs`` prompts of 16 to 112 random non-special tokens, as text (the same for every system)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = [token for token in range(len(tokenizer)) if token not in special]
    return [tokenizer.decode([rng.choice(vocabulary) for _ in range(rng.randint(16, 112))]) for _ in range(jobs)]


def run_engine(model, tokenizer, prompts: list[str], new_tokens: int, max_sequences: int, max_seq_len: int,
               system: str, concurrency: int) -> Measurement:
    limits = EngineLimits(max_sequences=max_sequences, max_seq_len=max_seq_len, max_prompt_tokens=max_seq_len - 1,
                          kv_cache_tokens=max_sequences * max_seq_len)
    engine = GenerationEngine(model, tokenizer, limits, name=system, eos_token_ids=())
    try:
        engine.warmup()
        sampling = Sampling(max_new_tokens=new_tokens)
        started = time.perf_counter()
        handles = [engine.submit(f"{system}-{i}", prompt, sampling) for i, prompt in enumerate(prompts)]
        outcomes = [handle.wait() for handle in handles]
        wall = time.perf_counter() - started
    finally:
        engine.close()
    failed = [o for o in outcomes if not o.finish.completed]
    if failed:
        raise RuntimeError(f"{system}: {len(failed)} jobs did not complete: {failed[0]}")
    tokens = sum(o.tokens_generated for o in outcomes)
    # Every completed outcome has a first token, so a time to it.
    ttft = (percentiles(o.ttft_s for o in outcomes if o.ttft_s is not None) if len(prompts) == concurrency
            else None)
    return Measurement(system, concurrency, len(prompts), tokens, wall, tokens / wall,
                       ttft["p50"] if ttft else None, ttft["p99"] if ttft else None)


def run_generate_batch(model, token_ids: list[list[int]], new_tokens: int, device: str) -> Measurement:
    """transformers' continuous batching on ``token_ids``, greedy, no end-of-sequence.

    On CUDA the library sizes its paged cache itself. On CPU the cache is sized explicitly: the
    automatic sizing, meant for GPU memory, gave 10 tokens/s with the tiny Llama.
    """
    from transformers import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = None
    if device == "cpu":
        page = 64
        positions = sum(len(ids) + new_tokens for ids in token_ids)
        # transformers 5.18 renamed block_size to page_size.
        fields = inspect.signature(ContinuousBatchingConfig).parameters
        page_field = "page_size" if "page_size" in fields else "block_size"
        batching = ContinuousBatchingConfig(**{page_field: page}, num_blocks=positions // page + 2 * len(token_ids),
                                            max_batch_tokens=2048, max_requests_per_batch=len(token_ids))
    outputs = model.generate_batch(token_ids, generation_config=config, continuous_batching_config=batching,
                                   record_timestamps=True)
    results = list(outputs.values())
    if len(results) != len(token_ids) or any(r.error for r in results):
        raise RuntimeError(f"generate_batch returned {len(results)} of {len(token_ids)} results, errors: "
                           f"{[r.error for r in results if r.error][:1]}")
    started = min(r.created_time for r in results)
    wall = max(r.timestamps[-1] for r in results) - started
    tokens = sum(len(r.generated_tokens) for r in results)
    ttft = percentiles(r.timestamps[0] - r.created_time for r in results)
    return Measurement("generate_batch", len(token_ids), len(token_ids), tokens, wall, tokens / wall,
                       ttft["p50"] if ttft else None, ttft["p99"] if ttft else None)


def benchmark(model, tokenizer, device: str, levels: list[int], new_tokens: int, serial_cap: int,
              failures: list[dict]) -> list[Measurement]:
    """Every system at every level; a system that raises is recorded in ``failures`` and skipped."""
    measurements = []
    for level in levels:
        prompts = make_prompts(tokenizer, level, seed=level)
        token_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
        max_seq_len = max(map(len, token_ids)) + new_tokens + 1
        runs = [
            functools.partial(run_engine, model, tokenizer, prompts, new_tokens, level, max_seq_len, "engine", level),
            functools.partial(run_engine, model, tokenizer, prompts[:serial_cap], new_tokens, 1, max_seq_len,
                              "one_at_a_time", level),
            functools.partial(run_generate_batch, model, token_ids, new_tokens, device),
        ]
        for run in runs:
            try:
                run()  # untimed: first-call costs of these shapes (kernel selection, allocator) stay out
                measurement = run()
            except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others' figures
                print(f"{level:>5} failed: {type(exc).__name__}: {exc}", flush=True)
                failures.append({"concurrency": level, "error": f"{type(exc).__name__}: {exc}"})
                continue
            measurements.append(measurement)
            print(format_row(measurement), flush=True)
    return measurements


def format_row(m: Measurement) -> str:
    def ms(value):
        return f"{value * 1000:9.1f}" if value is not None else "      n/a"

    return (f"{m.concurrency:>5} {m.system:<15} {m.jobs:>5} {m.tokens:>7} {m.wall_s:>8.2f} {m.tokens_per_s:>10.1f} "
            f"{ms(m.ttft_p50_s)} {ms(m.ttft_p99_s)}")


def ratios(measurements: list[Measurement]) -> dict[int, dict[str, float]]:
    """Per level: engine tokens/s over one_at_a_time's and over generate_batch's."""
    by_level: dict[int, dict[str, float]] = {}
    for m in measurements:
        by_level.setdefault(m.concurrency, {})[m.system] = m.tokens_per_s
    return {level: {f"vs_{other}": rates["engine"] / rates[other] for other in ("one_at_a_time", "generate_batch")
                    if "engine" in rates and other in rates}
            for level, rates in by_level.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--levels", help="comma-separated concurrency levels (default: cpu 1,16; cuda 1,8,32,64,128)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--serial-cap", type=int, default=16,
                        help="most jobs the one-at-a-time path runs per level (its tokens/s does not depend on N)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    levels = [int(n) for n in (args.levels or ("1,16" if args.device == "cpu" else "1,8,32,64,128")).split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = random_llama_1b("cuda") if args.device == "cuda" else demo_tiny_llama(Path(scratch) / "m")
        parameters = sum(p.numel() for p in model.parameters())
        print(f"model: {parameters / 1e6:.1f} M parameters, {model.dtype}, {model.device}; "
              f"{args.new_tokens} new tokens")
        print(f"{'N':>5} {'system':<15} {'jobs':>5} {'tokens':>7} {'wall_s':>8} {'tokens/s':>10} {'ttft_p50':>9} "
              f"{'ttft_p99':>9}  (ms)")
        failures: list[dict] = []
        measurements = benchmark(model, tokenizer, args.device, levels, args.new_tokens, args.serial_cap, failures)
    summary = ratios(measurements)
    for level, ratio in summary.items():
        print(f"N={level}: engine = " + ", ".join(f"{value:.2f}x {name[3:]}" for name, value in ratio.items()))
    if args.out:
        report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": (provenance.commit() or "unknown"),
                  "machine": _machine(args.device), "torch": torch.__version__,
                  "transformers": transformers.__version__, "device": args.device, "parameters": parameters,
                  "dtype": str(model.dtype), "new_tokens": args.new_tokens,
                  "measurements": [asdict(m) for m in measurements], "ratios": summary, "failures": failures}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failures else 0




def _machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, {torch.get_num_threads()} torch threads"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


if __name__ == "__main__":
    sys.exit(main())
