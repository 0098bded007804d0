#!/usr/bin/env bash
# The GPU benchmark, in one command, on the lent GPU machine (Python 3.12 with torch and
# transformers; celery, redis-py & co. come as carried wheels, see device_env.sh).
#
# From the repository root, with carry [".whl", ".devbin"]:
#
#     FLEET_BENCH_COMMIT=<commit> bash bench/gpu/run.sh
#
# (the commit the reports name: the copy of the working tree there carries no reliable git
# metadata; bench/provenance.py). Pass --bench-only to skip the tests.
#
# 1. sets up the runtime (bench/gpu/device_env.sh) and records the GPU and library versions;
# 2. runs every CUDA test (pytest -m gpu): the embedder's graph replay equals eager, fp16/bf16,
#    the generation engine on CUDA, mixed-precision training, and a worker group on the GPU
#    (spawned device process, consumers without torch) taking mixed jobs;
# 3. runs `python3 -m bench.run --device cuda` (BERT-base, random weights, seq 128, fp16):
#    raw model, plain Celery and Fleet side by side, with its own private redis-server.
#
# Everything lands in $OUT (else bench/results/gpu): gpu.json (the full report), gpu-table.txt
# (the printed table and targets), gpu-tests.txt, env.txt, and the worker logs on failure.
# Bounded to under 9 minutes: tests 200 s, benchmark 330 s (its own budget is 300 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
source bench/gpu/device_env.sh || exit 1
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit ${FLEET_BENCH_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  nproc; grep -m1 'model name' /proc/cpuinfo
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

tests_rc=0
if [ "${1:-}" != "--bench-only" ]; then
echo "== gpu tests"
timeout 200 python3 -m pytest -m gpu tests/unit/test_batching_gpu.py tests/unit/test_generation_gpu.py \
  tests/unit/test_training_loop.py tests/integration/test_gpu_fleet.py -q -p no:cacheprovider -o addopts="" 2>&1 \
  | tee "$OUT/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}
fi

echo "== benchmark"
timeout 330 python3 -m bench.run --device cuda --budget-s 300 --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu-table.txt"
bench_rc=${PIPESTATUS[0]}
if [ "$bench_rc" -ne 0 ]; then
  for log in /tmp/fleet-bench-*/*.log; do [ -f "$log" ] && tail -n 60 "$log" > "$OUT/$(basename "$log")"; done
fi
echo "tests rc=$tests_rc bench rc=$bench_rc, $(( $(date +%s) - started )) s in all"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
