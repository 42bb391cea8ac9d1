#!/usr/bin/env bash
# One call on a lent GPU machine: GPU-only tests, then every benchmark file, JSON into OUT_DIR.
#
#   bench/gpu_check.sh OUT_DIR
#
# Uses the image's own python3/torch/triton (nothing is reinstalled); the package is found through
# PYTHONPATH. Stays under 8 minutes (NANOLLAMA_GPU_CHECK_S, default 450 s, from start to the last
# stage): stages run in priority order (the kernel issues' targets first), each with its own time
# limit cut to what is left; a stage that fails or runs out of time does not stop the next one.
# A stage out of time gets SIGINT, not SIGTERM: pytest then still finishes its session and
# pytest-benchmark writes the JSON of the benchmarks already done (a stage stuck inside a CUDA call
# cannot act on SIGINT: it is killed 15 s later and its JSON is lost). Give the remote call a time
# limit of NANOLLAMA_GPU_CHECK_S + 60 s. Exit status: 0 when every stage passed.
#
# What OUT_DIR holds at the end, whatever happened (a remote call brings back only a few files):
#   summary.txt       environment, each stage's last lines, the benchmark table and the targets
#   targets.md        the issues' targets, PASS / MISS / not measured
#   results.tar.gz    everything else: env.txt, every stage's log, bench_*.json, gpu_tests.xml
#   caches.tar.gz     Triton, inductor and nanollama caches, to start a later call warm: give its path
#                     as NANOLLAMA_GPU_WARM=FILE and it is unpacked before the first stage
set -u
OUT_DIR=${1:?usage: bench/gpu_check.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Real kernels, default dispatch. TRITON_INTERPRET=0 rather than unset: test modules that
# setdefault it to 1 (for CPU machines) must not switch the interpreter on here.
export TRITON_INTERPRET=0
unset NANOLLAMA_KERNELS
# Compiled flex costs one compile per (mask, length, pass): the two ends of the range fit the time limit.
export NANOLLAMA_BENCH_ATTN_SEQ=${NANOLLAMA_BENCH_ATTN_SEQ:-1024,8192}
DEADLINE=$(($(date +%s) + ${NANOLLAMA_GPU_CHECK_S:-450}))
status=0
# Compile and autotune caches inside OUT_DIR, packed at the end (and restored from an earlier call's pack).
CACHE="$OUT_DIR/cache"
export TRITON_CACHE_DIR="$CACHE/triton" TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor" NANOLLAMA_CACHE_DIR="$CACHE/nanollama"
mkdir -p "$CACHE"
if [[ -n ${NANOLLAMA_GPU_WARM:-} && -s ${NANOLLAMA_GPU_WARM:-} ]]; then
  tar -xzf "$NANOLLAMA_GPU_WARM" -C "$OUT_DIR" && echo "== warm caches from $NANOLLAMA_GPU_WARM"
fi

pack() {  # on any exit: a handful of files, the rest in archives
  cd "$OUT_DIR" || return
  {
    cat env.txt 2>/dev/null
    for log in *.log; do
      [[ -f $log ]] && { echo "== $log"; tail -n 3 "$log"; }
    done
    [[ -f table.txt ]] && { echo "== benchmarks"; cat table.txt; }
    [[ -f targets.txt ]] && { echo "== targets"; cat targets.txt; }
  } >summary.txt 2>&1
  tar -czf caches.tar.gz cache 2>/dev/null && rm -rf cache
  local files=(env.txt *.log bench_*.json gpu_tests.xml table.txt targets.txt)
  local present=()
  for f in "${files[@]}"; do [[ -f $f ]] && present+=("$f"); done
  ((${#present[@]})) && tar -czf results.tar.gz "${present[@]}" && rm -f "${present[@]}"
}
trap pack EXIT

# stage NAME LIMIT_S ARGS...: pytest ARGS under min(LIMIT_S, time left), output in OUT_DIR/NAME.log
stage() {
  local name=$1 limit=$2 left
  shift 2
  left=$((DEADLINE - $(date +%s)))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "== $name: skipped, out of time" | tee "$OUT_DIR/$name.log"
    status=1
    return
  fi
  echo "== $name (up to ${limit} s)"
  timeout -s INT -k 15 "$limit" "$PY" -m pytest -q -p no:cacheprovider "$@" >"$OUT_DIR/$name.log" 2>&1 || status=1
  tail -n 3 "$OUT_DIR/$name.log"
}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(0))"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

bench() {  # bench NAME LIMIT_S FILE [pytest args]: one benchmark file into OUT_DIR/bench_NAME.json
  local name=$1 limit=$2 file=$3
  shift 3
  stage "bench_$name" "$limit" "$file" --benchmark-only --benchmark-json="$OUT_DIR/bench_$name.json" \
    --benchmark-columns=median,iqr,rounds "$@"
}

stage gpu_tests 130 -m gpu tests --junitxml="$OUT_DIR/gpu_tests.xml"
bench rope 50 bench/bench_rope.py
bench decode 50 bench/bench_decode.py -k "not ref"  # the fp32 reference only informs, and is slow
bench attention 170 bench/bench_attention.py
bench scan 60 bench/bench_scan.py
bench generate 40 bench/bench_generate.py
bench train 60 bench/bench_train.py
bench gssm 20 bench/bench_gssm.py

# A short table of every benchmark, then the issues' targets, PASS/MISS, last of all (a remote call
# returns only the end of the output; targets.md lies beside the JSON).
results=()
for f in "$OUT_DIR"/bench_*.json; do
  [[ -s $f ]] && results+=("$f")  # pytest-benchmark leaves an empty file when nothing ran
done
if ((${#results[@]} == 0)); then
  echo "no benchmark JSON was written"
  exit 1
fi
"$PY" - "${results[@]}" >"$OUT_DIR/table.txt" <<'PYEOF' || status=1
import json, sys
for path in sys.argv[1:]:
    try:
        benchmarks = json.load(open(path))["benchmarks"]
    except (OSError, ValueError, KeyError) as e:
        print(f"{path}: unreadable ({e})")
        continue
    for b in benchmarks:
        e = b["extra_info"]
        rate = f"{e['gb_per_s']:8.1f} GB/s" if "gb_per_s" in e else f"{e.get('tflop_per_s', 0):8.1f} TFLOP/s"
        frac = e.get("frac_measured_bw", e.get("frac_peak_bw", e.get("frac_peak_flops", "")))
        mem = e.get("call_mem_bytes", 0) / 2**20
        print(f"{b['name'][:70]:70s} {b['stats']['median'] * 1e6:10.1f} us {rate} frac {frac} mem+{mem:.0f}MiB")
PYEOF
cat "$OUT_DIR/table.txt"
echo "== targets"
"$PY" bench/targets.py "${results[@]}" --md "$OUT_DIR/targets.md" >"$OUT_DIR/targets.txt" || status=1
cat "$OUT_DIR/targets.txt"
exit $status
