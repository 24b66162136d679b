#!/usr/bin/env bash
# `make gpu-check`: everything a lent GPU machine should tell us, in one command of <= 8 minutes.
#   1. build the CUDA extension for the visible GPU's architecture only
#   2. run the GPU tests: the fast, broad ones first, then the hypothesis property cases
#   3. `actshift bench --device cuda --quick` for every op
#   4. write benchmarks/results/cuda.csv, cuda.png, cuda-tests.log and cuda-check.log (stage times)
# Each stage has its own time limit (together 8 minutes), so a slow stage costs its own results,
# not the later ones; the benchmark CSV is rewritten after every case.
# Without a GPU it is a dry run: the build and the collection of the GPU tests run, the GPU stages
# are skipped, the logs go to benchmarks/results/runs/ (not committed), and it exits 2 saying so.
set -uo pipefail

PY=${PY:-python3}
failed=0
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)
OUT=benchmarks/results
[ -n "$gpu" ] || OUT=benchmarks/results/runs
mkdir -p "$OUT"
TIMES=$OUT/cuda-check.log
TESTLOG=$OUT/cuda-tests.log
: >"$TIMES"

# stage NAME LIMIT_S LOG CMD...: runs CMD under a time limit (its output also appended to LOG
# unless LOG is -), records its duration and exit status.
stage() {
  local name=$1 limit=$2 log=$3 rc
  shift 3
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  if [ "$log" = - ]; then
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    rc=$?
  else
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  fi
  local line
  line=$(printf '%-16s %5ds  rc=%d%s' "$name" $((SECONDS - t0)) "$rc" "$([ "$rc" = 124 ] && echo ' (time limit)')")
  echo "$line" | tee -a "$TIMES"
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || failed=1  # 5: pytest collected nothing
  return 0
}

if [ -n "$gpu" ]; then
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  echo "gpu-check on $gpu (sm_${arch/./}), $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')" | tee -a "$TIMES"
else
  arch=""
  echo "gpu-check: no CUDA GPU visible to torch: dry run (build and test collection only)" | tee -a "$TIMES"
fi

# 1. Build (editable, so the tests and the bench import this tree); one architecture keeps nvcc short.
TORCH_CUDA_ARCH_LIST=${arch:-${TORCH_CUDA_ARCH_LIST:-}} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  stage build 210 - "$PY" -m pip install --no-build-isolation --no-deps -e . -q
if [ -n "$gpu" ]; then
  stage cuda-built 20 - "$PY" -c "
import sys, torch, actshift
from actshift import backends
why = backends.unavailable_reason('cuda', torch.device('cuda'))
sys.exit(f'the cuda backend is unavailable: {why}' if why else 0)"
fi

# 2. GPU tests. Broad and fast first (every op on cuda and triton, opcheck, compile, graphs), then
# the hypothesis cases, which compile more Triton variants (odd widths, every dtype).
pytest_args=(-q -p no:cacheprovider -rfEs --durations=15)
: >"$TESTLOG"
if [ -n "$gpu" ]; then
  stage tests-gpu 120 "$TESTLOG" "$PY" -m pytest tests -m "(cuda or triton) and not slow" -k "not property" "${pytest_args[@]}"
  stage tests-property 30 "$TESTLOG" "$PY" -m pytest tests -m "cuda and not slow" -k "property" "${pytest_args[@]}"
else
  stage tests-collect 120 "$TESTLOG" "$PY" -m pytest tests -m "cuda or triton" --collect-only -q -p no:cacheprovider
fi

# 3. Benchmarks: every op, quick shapes, the committed results file (cuda.csv / cuda.png).
if [ -n "$gpu" ]; then
  stage bench 100 - "$PY" -m actshift.cli bench --device cuda --quick --update-results
fi

echo "stage times: $TIMES; test log: $TESTLOG"
cat "$TIMES"
if [ -z "$gpu" ]; then
  echo "gpu-check: dry run only (no GPU); nothing was measured" >&2
  exit 2
fi
exit $failed
