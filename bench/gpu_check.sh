#!/usr/bin/env bash
# One call on a lent GPU machine: GPU-only tests, then the whole benchmark suite, JSON into OUT_DIR.
#
#   bench/gpu_check.sh OUT_DIR
#
# Uses the image's own python3/torch/triton (nothing is reinstalled); the package is found through
# PYTHONPATH. Stays under 8 minutes: each stage has its own time limit and a stage that fails or
# runs out of time does not stop the next one. Exit status: 0 when every stage passed.
set -u
OUT_DIR=${1:?usage: bench/gpu_check.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Real kernels, default dispatch. TRITON_INTERPRET=0 rather than unset: test modules that
# setdefault it to 1 (for CPU machines) must not switch the interpreter on here.
export TRITON_INTERPRET=0
unset NANOLLAMA_KERNELS
# Compiled flex costs one compile per (mask, length): the two ends of the range fit the time limit.
export NANOLLAMA_BENCH_ATTN_SEQ=${NANOLLAMA_BENCH_ATTN_SEQ:-1024,8192}
status=0

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(0))"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

echo "== gpu tests"
timeout 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml" \
  >"$OUT_DIR/gpu_tests.log" 2>&1 || status=1
tail -n 15 "$OUT_DIR/gpu_tests.log"

echo "== benchmarks"
timeout 300 "$PY" -m pytest bench -q --benchmark-only -p no:cacheprovider \
  --benchmark-json="$OUT_DIR/bench.json" --benchmark-columns=median,iqr,rounds \
  >"$OUT_DIR/bench.log" 2>&1 || status=1
tail -n 5 "$OUT_DIR/bench.log"

# A short table last (a remote call returns only the end of the output).
"$PY" - "$OUT_DIR/bench.json" <<'PYEOF' || status=1
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    rate = f"{e['gb_per_s']:8.1f} GB/s" if "gb_per_s" in e else f"{e.get('tflop_per_s', 0):8.1f} TFLOP/s"
    frac = e.get("frac_measured_bw", e.get("frac_peak_bw", e.get("frac_peak_flops", "")))
    mem = e.get("call_mem_bytes", 0) / 2**20
    print(f"{b['name'][:70]:70s} {b['stats']['median'] * 1e6:10.1f} us {rate} frac {frac} mem+{mem:.0f}MiB")
PYEOF

# The issues' targets, PASS/MISS, last of all (targets.md beside bench.json).
echo "== targets"
"$PY" bench/targets.py "$OUT_DIR/bench.json" --md "$OUT_DIR/targets.md" || status=1
exit $status
