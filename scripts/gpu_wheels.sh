#!/usr/bin/env bash
# On the CPU machine (which reaches the package registries), before a GPU session: downloads into .whl/ the wheels
# that fastseg's tests need and the GPU machine's image lacks (its python3 3.12 already holds torch, triton, timm,
# onnx, onnxruntime, pytest and pytest-benchmark; nothing can be fetched there). scripts/gpu_session.sh installs them.
# .whl/ must be ignored (`echo /.whl/ >> .git/info/exclude`) and named in the device call's `carry`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
git check-ignore -q .whl/ || { echo "add /.whl/ to .git/info/exclude first" >&2; exit 1; }
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
# The versions the CPU environment tests with (setup.py's test extra); ftfy and wcwidth are open_clip's (its other
# needs, regex, tqdm, huggingface_hub, safetensors, timm and torchvision, are in the image's package list).
python3 -m pip download -q "${args[@]}" pycocotools==2.0.11 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
ls -l .whl
