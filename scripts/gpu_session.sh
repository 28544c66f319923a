#!/usr/bin/env bash
# Every GPU check of a session in one call on the lent GPU machine (a bare image: python3 with torch and triton, no
# network), so that a short device lease is spent on the checks rather than on starts. From the repo root there:
#
#   FASTSEG_COMMIT=<sha> bash scripts/gpu_session.sh "$OUT"   # after scripts/gpu_wheels.sh here; carry [".whl"]
#
# Writes to OUT: env.txt (GPU, driver, versions, commit, each step's exit status), gpu_tests.log and .xml (every test
# marked `gpu`), bench.json and bench.log (`fastseg bench` of every kernel family and the default models on the
# GPU). Each step has its own time limit (GPU_TESTS_S, BENCH_S seconds), so one hanging step cannot eat the lease;
# a step that fails does not stop the next. Exit status: 0 only when every step passed.
set -uo pipefail
OUT="${1:?usage: bash scripts/gpu_session.sh OUT_DIR}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"  # absolute before the cd below
GPU_TESTS_S="${GPU_TESTS_S:-240}"
BENCH_S="${BENCH_S:-240}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record its exit status
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout -k 15 "$seconds" "$@"  # KILL 15 s after TERM: a process stuck in a CUDA call may ignore TERM
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (limit $seconds s)" | tee -a "$OUT/env.txt"
  [ "$rc" -eq 0 ] || status=1
}

if compgen -G ".whl/*.whl" > /dev/null; then  # the wheels of scripts/gpu_wheels.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# fastseg without an install: the source tree on the path, and kernels/ where setup.py's package_dir maps it.
[ -e fastseg/kernels ] || [ -L fastseg/kernels ] || ln -s ../kernels fastseg/kernels
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  # The device gets a copy of the working tree without .git: pass FASTSEG_COMMIT=$(git rev-parse HEAD) from here.
  echo "commit ${FASTSEG_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() \
else None)" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device is visible: nothing to check here" | tee -a "$OUT/env.txt"
  exit 3
fi

step gpu_tests "$GPU_TESTS_S" python3 -m pytest -q -m gpu -p no:cacheprovider tests --junitxml "$OUT/gpu_tests.xml" \
  > "$OUT/gpu_tests.log" 2>&1
tail -n 25 "$OUT/gpu_tests.log"
step bench "$BENCH_S" python3 -m fastseg.cli bench --kernels all --models default --device cuda --no-static \
  --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
tail -n 40 "$OUT/bench.log"
exit "$status"
