#!/usr/bin/env bash
# The GPU check in one call: install sparsekern without network, run the GPU tests, run the benchmark
# suite on CUDA, keep every log under $OUT and print a short table last.
#   OUT=/some/dir benchmarks/gpu_check.sh        (on the GPU machine, from any directory)
# Env: OUT (default: a new temporary folder), BENCH_BUDGET seconds of timed calls per implementation
# (default 0.5; the suite's own default of 2 does not fit one 10-minute device call), BENCH_ONLY (one case
# module, e.g. triton_masked_linear). Exit status: 0 only when install, tests and benchmarks all succeeded.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0

echo "== install (log: $OUT/install.log)"
if ! pip install --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    tail -n 30 "$OUT/install.log"
    echo "install failed"
    exit 1
fi
python -c "import torch, triton, sparsekern; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
    | tee "$OUT/environment.txt"

echo "== GPU tests (log: $OUT/gpu_tests.log)"
python -m pytest -q -rfEs -m gpu tests >"$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 5 "$OUT/gpu_tests.log"

echo "== benchmarks (log: $OUT/bench.log, progress: $OUT/bench_progress.log, rows: $OUT/bench.json)"
only=()
if [ -n "${BENCH_ONLY:-}" ]; then only=(--only "$BENCH_ONLY"); fi
python -m benchmarks --device cuda --budget "${BENCH_BUDGET:-0.5}" "${only[@]}" --json "$OUT/bench.json" \
    >"$OUT/bench.log" 2>"$OUT/bench_progress.log" || status=1

echo "== summary: sparsekern and BSR rows (ratio = baseline time / time, > 1 is faster)"
python - "$OUT/bench.json" <<'PY' || status=1
import json, sys
report = json.load(open(sys.argv[1]))
print(report["environment"])
print(f"{'op':40} {'size':48} {'implementation':22} {'ms':>9} {'ratio':>7}  baseline")
for row in report["rows"]:
    if row["implementation"].startswith("sparsekern") or "BSR" in row["implementation"]:
        time_ms = "failed" if row["time_ms"] is None else f"{row['time_ms']:.3f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['op'][:40]:40} {row['size'][:48]:48} {row['implementation']:22} {time_ms:>9} {ratio:>7}  "
              f"{row['baseline']}" + (f"  ({row['error'][:60]})" if row["error"] else ""))
PY
echo "gpu_check status: $status (logs in $OUT)"
exit $status
