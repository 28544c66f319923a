#!/usr/bin/env bash
# Creates (or reuses) .venv and installs fastseg with its test/bench/export extras. Idempotent: a stamp keyed on
# setup.py and this script skips the install when nothing changed. Sourced by scripts/main.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTSEG_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[fastseg] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.fastseg-installed-$(cat "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "[fastseg] installing dependencies into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torchvision (needed by timm) must match torch; these pairs are the ones with wheels for each architecture.
  case "$(uname -m)" in
    aarch64|arm64) TORCH_PINS="torch==2.9.1 torchvision==0.24.1" ;;
    *) TORCH_PINS="torch==2.14.1 torchvision==0.29.1" ;;
  esac
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_PINS
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  rm -f "$VENV"/.fastseg-installed-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
