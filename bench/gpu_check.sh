#!/usr/bin/env bash
# GPU check, prepared for a machine with an NVIDIA GPU:
#   1. set up (make setup; if that cannot reach a package index, build the
#      native libraries in place and use the machine's python + torch),
#   2. run the whole test suite (the "cuda" parametrisations and the
#      gpu_large cases run wherever a GPU is present),
#   3. run the kernel benchmark on cuda (python bench/kernels.py),
#   4. write everything under bench/results/ (and copy it to $OUT if set).
#
# Usage: bench/gpu_check.sh            (quick benchmark)
#        FULL=1 bench/gpu_check.sh     (full benchmark)
# Knobs: TEST_TIMEOUT (s, default 330), BENCH_TIMEOUT (s, default 200),
#        PYTEST_ARGS (extra pytest arguments, e.g. "-x" or "-k native").
set -uo pipefail
cd "$(dirname "$0")/.."
RES=bench/results
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
status=0

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  nvcc --version 2>/dev/null | tail -1 || echo "nvcc: not found"
  nproc; uname -srm; } 2>&1 | tee -a "$LOG"

# 1. setup --------------------------------------------------------------------
PY=.venv/bin/python
if make setup >>"$LOG" 2>&1; then
  say "make setup: ok"
else
  say "make setup failed (no package index?): building in place instead"
  # the venv (if make got that far) sees the machine's torch and pytest too
  [ -x .venv/bin/python ] || PY=$(command -v python3)
  "$PY" setup.py build_native --force >>"$LOG" 2>&1 || { say "build_native FAILED"; status=1; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
from fsam_kernels.backends import backend_availability
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
for n in ("cpu", "cuda", "triton", "foreach"):
    dev = "cpu" if n == "cpu" else "cuda"
    print(f"backend {n:8s} on {dev}:", backend_availability(n, dev))
EOF

# 2. tests ---------------------------------------------------------------------
say "pytest (whole suite; cuda cases included)"
timeout "${TEST_TIMEOUT:-330}" "$PY" -m pytest -q -rs tests ${PYTEST_ARGS:-} \
  --junitxml="$RES/gpu_check-tests.xml" >"$RES/gpu_check-tests.txt" 2>&1
rc=$?
tail -n 40 "$RES/gpu_check-tests.txt" | tee -a "$LOG"
say "pytest exit code $rc"
[ $rc -eq 0 ] || status=1

# 3. benchmark -----------------------------------------------------------------
MODE=--quick
[ "${FULL:-0}" = "1" ] && MODE=
if [ -f bench/kernels.py ]; then
  say "python bench/kernels.py --device cuda $MODE"
  timeout "${BENCH_TIMEOUT:-200}" "$PY" bench/kernels.py --device cuda $MODE --out "$RES" \
    >"$RES/gpu_check-bench.txt" 2>&1
  rc=$?
  tail -n 40 "$RES/gpu_check-bench.txt" | tee -a "$LOG"
  say "bench exit code $rc"
  [ $rc -eq 0 ] || status=1
else
  say "bench/kernels.py missing: benchmark skipped"
fi

# 4. results ---------------------------------------------------------------------
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  cp -r "$RES"/. "$OUT"/ 2>/dev/null || true
fi
say "done (status $status); results in $RES"
exit $status
