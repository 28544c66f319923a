#!/usr/bin/env bash
# One command for the tests on a fresh machine: sets up .venv, runs ruff (lint + format check) and mypy on the TensorRT
# builder, the unit suite (CPU; Triton kernels through Triton's interpreter), then executes every benchmark case once
# in smoke mode. Fails when a check or a test fails, or when no test ran.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh

echo "[fastseg] lint and format (ruff, configured in pyproject.toml)"
ruff check .
ruff format --check .

echo "[fastseg] type check of the TensorRT builder against the TensorRT 10 API stubs (mypy)"
python scripts/typecheck_tensorrt.py

echo "[fastseg] unit tests"
python -m pytest -q "$@"  # pytest exits 5 when no test ran: set -e turns that into a failure too

echo "[fastseg] benchmark smoke run (every case once at tiny shapes; no timing is meaningful here)"
FASTSEG_BENCH_SMOKE=1 python -m pytest -q benchmarks --benchmark-disable -p no:cacheprovider
