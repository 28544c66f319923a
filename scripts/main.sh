#!/usr/bin/env bash
# The main job on a fresh machine: sets up .venv and runs `fastseg bench` (kernels and models on this device,
# a table, JSON and a plot under runs/bench/). Extra arguments go to `fastseg bench`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
mkdir -p runs/bench
fastseg bench --json runs/bench/bench.json --plot runs/bench/bench.png "$@"
