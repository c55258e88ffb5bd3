#!/usr/bin/env bash
# The GPU check in one run of at most ~8 minutes (issue 16): install and build without network, the
# GPU tests (pytest -m gpu) with compute-sanitizer memcheck and racecheck beside them, the goal
# benchmarks on an idle GPU, an ncu profile, and the results file. Run from anywhere in the checkout:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Env: OUT (results folder; default a new temporary one), GPU_CHECK_BUDGET (seconds for the whole run;
# default 470), GPU_CHECK_SKIP (step names to skip, space-separated: warm tests sanitize goals profile),
# GPU_CHECK_DRY_RUN=1 (also chosen when no GPU is visible): every step's logic on the CPU with tiny sizes
# and short timeouts, installing and building nothing (tests/bench/test_gpu_check.py runs it),
# GPU_CHECK_PYTHON (default python3), MAX_JOBS (parallel nvcc jobs; default the CPU count, at most 16).
#
# Each step has a timeout (SIGINT first, so pytest prints its summary) and is skipped when less time is
# left than it needs; its results are in $OUT as soon as it ends, so a run stopped at its limit keeps
# everything it finished. Files: summary.txt (step log, test summaries, goal table; printed last),
# env.json, build.log, warm.log, tests.log, sanitize.log, goals.jsonl + goals.log, profile.log, and
# results/<date>-<h100|h200>.md (commit it as benchmarks/results/). Exit status 1 if a step failed.
set -uo pipefail
START=$(date +%s)
PY=${GPU_CHECK_PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUM=$OUT/summary.txt
: > "$SUM"
SKIP=" ${GPU_CHECK_SKIP:-} "
FAILED=0
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

DRY=${GPU_CHECK_DRY_RUN:-}
if [ -z "$DRY" ]; then
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then DRY=0; else DRY=1; fi
fi
if [ "$DRY" = 1 ]; then
  BUDGET=${GPU_CHECK_BUDGET:-120}
  GOALS=("$PY" -m benchmarks.gpu_goals --dry-run)
else
  BUDGET=${GPU_CHECK_BUDGET:-470}
  GOALS=("$PY" -m benchmarks.gpu_goals)
fi
DEADLINE=$((START + BUDGET))
JOBS=${MAX_JOBS:-$(nproc)}
(( JOBS > 16 )) && JOBS=16
# PYTHONPATH: `benchmarks` (the workloads, the pytest plugin) is not an installed package, and pytest-xdist
# workers do not start in the checkout's root.
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Outside OUT (it is not a result), and kept: a rerun on the same machine finds its kernels compiled.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/sparsekern-triton-cache}
if [ -d /usr/local/cuda/bin ]; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export PATH=$CUDA_HOME/bin:$PATH
fi

note() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$SUM"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
# A step's timeout: its own limit, shorter in a dry run (every step there takes seconds).
limit() { if [ "$DRY" = 1 ]; then echo $(( $1 < 60 ? $1 : 60 )); else echo "$1"; fi }
skipped() { [[ "$SKIP" == *" $1 "* ]]; }

# step NAME MAX_S MIN_S LOG cmd...: runs cmd under `timeout` for min(MAX_S, time left), appending its
# output to LOG; skipped (rc 0) when GPU_CHECK_SKIP names it or when less than MIN_S seconds are left.
step() {
  local name=$1 max min=$3 log=$4
  max=$(limit "$2")
  shift 4
  if skipped "$name"; then note "$name: skipped (GPU_CHECK_SKIP)"; return 0; fi
  local remaining
  remaining=$(left)
  if (( remaining < min )); then note "$name: SKIPPED, ${remaining}s left (needs ${min}s)"; return 0; fi
  local t=$(( max < remaining ? max : remaining ))
  note "$name: start (timeout ${t}s, log $(basename "$log"))"
  echo "===== $name: $* (timeout ${t}s)" >> "$log"
  local begin rc
  begin=$(date +%s)
  timeout -s INT -k 20 "$t" "$@" >> "$log" 2>&1
  rc=$?
  note "$name: rc=$rc$( (( rc == 124 )) && echo ' TIMEOUT') after $(( $(date +%s) - begin ))s"
  (( rc != 0 )) && FAILED=1
  return $rc
}
# The pytest outcome lines of LOG (from the line matching FROM on), into the summary.
pytest_tail() {
  sed -n "/${2:-.}/,\$p" "$1" | grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran" \
    | tail -n 20 | cut -c1-300 | sed 's/^/    /' >> "$SUM"
}
has_module() { $PY -c "import $1" 2>/dev/null; }

note "gpu_check: $( [ "$DRY" = 1 ] && echo 'DRY RUN on the CPU' || echo 'GPU run'), budget ${BUDGET}s, out $OUT, root $ROOT"

# ---------------------------------------------------------------------------------- 1. install
# A pure-Python editable install first (seconds), so that the Triton warm-up can import sparsekern while
# the CUDA extension builds; then the real install, which builds the C++/CUDA extension in place.
# -v: without it pip shows a build's output only when the build fails, and the summary quotes setup.py's
# `[sparsekern build]` line (what it builds, and why) from a build that succeeded too.
INSTALL=("$PY" -m pip install -v --no-deps --no-index --no-build-isolation -e .)
if [ "$DRY" = 1 ]; then
  echo "dry run: would run SPARSEKERN_CPP=0 ${INSTALL[*]}, then SPARSEKERN_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$JOBS ${INSTALL[*]}" \
    >> "$OUT/build.log"
  step install 60 5 "$OUT/build.log" "$PY" -c "import sparsekern; print('sparsekern imports from', sparsekern.__file__)"
else
  step install_python 90 20 "$OUT/build.log" env SPARSEKERN_CPP=0 "${INSTALL[@]}"
fi
# Should pip fail here (a missing setuptools, say), run from the checkout instead: sparsekern on the
# path, its Triton kernels where setup.py would install them, the extension built in place.
EDITABLE=1
if [ "$DRY" != 1 ] && ! (cd /tmp && "$PY" -c "import sparsekern.triton_kernels") >> "$OUT/build.log" 2>&1; then
  EDITABLE=0
  note "install_python: sparsekern not importable: using the checkout (PYTHONPATH, a triton_kernels link)"
  ln -sfn ../triton_kernels sparsekern/triton_kernels
fi

# ----------------------------------------- 2. background: Triton warm-up while the extension builds
WARM_PID=""
if ! skipped warm && has_module triton; then
  WORKERS=$( [ "$DRY" = 1 ] && echo 1 || echo 4 )
  note "warm: $WORKERS workers compile the masked-linear goal configs in the background (log warm.log)"
  (
    for i in $(seq 0 $((WORKERS - 1))); do
      timeout -s INT -k 10 "$(limit 200)" "${GOALS[@]}" warm "$i" "$WORKERS" &
    done
    wait
  ) >> "$OUT/warm.log" 2>&1 &
  WARM_PID=$!
fi

# --------------------------------------------------------------------- 3. the CUDA extension build
if [ "$DRY" = 1 ]; then
  # pip's own dry run: setup.py decides what it would build, and says so, as in the real build; nothing
  # is built or installed. Without SPARSEKERN_CUDA=1, which a CPU build of torch cannot take.
  step build 60 5 "$OUT/build.log" "${INSTALL[@]}" --dry-run
else
  BUILD=("${INSTALL[@]}")
  (( EDITABLE == 0 )) && BUILD=("$PY" setup.py build_ext --inplace)
  step build 300 90 "$OUT/build.log" env SPARSEKERN_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" "${BUILD[@]}"
fi
# What was built (setup.py's line, printed at metadata time and again at build time) and, for a build that
# failed, why: its first error lines (a compiler's, setup.py's, pip's), from the build's own part of the log.
BUILD_LOG=$(sed -n '/^===== build: /,$p' "$OUT/build.log")
{ grep -F "[sparsekern build]" <<< "$BUILD_LOG" | sed 's/^ *//' | sort -u
  grep -vF "[sparsekern build]" <<< "$BUILD_LOG" | grep -m3 -iE "error:"; } | cut -c1-250 | sed 's/^/    /' >> "$SUM"
"${GOALS[@]}" env "$OUT" >> "$OUT/build.log" 2>&1
note "env: $("$PY" -c "import json,sys; e=json.load(open(sys.argv[1])); print(e.get('gpu'), '| torch', e.get('torch'), '| triton', e.get('triton'), '| extension', e.get('extension'), '| CUDA kernels', e.get('cuda_kernels'))" "$OUT/env.json" 2>&1)"

# ------------------------------------- 4. GPU tests, with compute-sanitizer on a small workload beside
SAN_PID=""
if ! skipped sanitize; then
  if [ "$DRY" != 1 ] && command -v compute-sanitizer > /dev/null; then
    # One cudaMalloc per tensor, so that memcheck sees an overrun of any tensor.
    (
      export PYTORCH_NO_CUDA_MEMORY_CACHING=1
      step memcheck 120 30 "$OUT/sanitize.log" compute-sanitizer --tool memcheck --leak-check no --print-limit 20 \
        "${GOALS[@]}" sanitize
      # racecheck follows every shared-memory access: a smaller workload.
      step racecheck 150 30 "$OUT/sanitize.log" compute-sanitizer --tool racecheck --racecheck-report all \
        --print-limit 20 "${GOALS[@]}" sanitize --small
      exit "$FAILED"
    ) &
  else
    step sanitize_workload 60 5 "$OUT/sanitize.log" "${GOALS[@]}" sanitize &
  fi
  SAN_PID=$!
fi
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
has_module triton && PYTEST+=(-p benchmarks.first_config_autotune)
if [ "$DRY" = 1 ]; then
  PYTEST+=(--collect-only tests/ops/test_cuda_kernels.py)  # the selection and the plugin, not the tests
else
  has_module xdist && PYTEST+=(-n 4)
  has_module pytest_timeout && PYTEST+=(--timeout=150)
  PYTEST+=(--durations=8 tests)
fi
step tests 240 60 "$OUT/tests.log" "${PYTEST[@]}" -m gpu
pytest_tail "$OUT/tests.log"
if [ -n "$SAN_PID" ]; then
  wait "$SAN_PID" || FAILED=1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|FAILED|workload finished" "$OUT/sanitize.log" \
    | sort | uniq -c | sed 's/^/    /' >> "$SUM"
fi
if [ -n "$WARM_PID" ]; then
  wait "$WARM_PID"
  note "warm: $(grep -c ': ok in' "$OUT/warm.log") problems compiled, $(grep -c '^warm .*Error' "$OUT/warm.log") failed"
fi

# ------------------------------------------------------ 5. goal benchmarks (the GPU to themselves)
step goals 150 40 "$OUT/goals.log" "${GOALS[@]}" goals "$OUT/goals.jsonl"

# ---------------------------------------------------------------------------- 6. ncu profile
if [ "$DRY" != 1 ] && command -v ncu > /dev/null; then
  step profile 90 45 "$OUT/profile.log" ncu --clock-control none --target-processes all \
    -k "regex:sparse_linear_kernel|add_splits|histogram|mask_kernel" -c 8 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    "${GOALS[@]}" profile
  grep -E "sparse_linear_kernel|histogram|mask_kernel|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per" \
    "$OUT/profile.log" | cut -c1-200 | tail -n 40 | sed 's/^/    /' >> "$SUM"
else
  step profile 60 20 "$OUT/profile.log" "${GOALS[@]}" profile
fi

# ------------------------------------------------------------------- 7. results file and summary
"${GOALS[@]}" results "$OUT" >> "$SUM" 2>&1 || FAILED=1
RESULTS=""
for f in "$OUT"/results/*.md; do [ -f "$f" ] && RESULTS=$f; done
if [ -n "$RESULTS" ]; then
  { echo "---------------------------------------------------------------- goals"
    grep -E "^\| " "$RESULTS" | cut -c1-260
    grep -E "^Routing" "$RESULTS"; } >> "$SUM"
fi
note "done in $(( $(date +%s) - START ))s of ${BUDGET}s; failed steps: $FAILED; files: $(cd "$OUT" && printf '%s ' *)"
echo "================================================================= summary ($SUM)"
cat "$SUM"
exit "$FAILED"
