"""What a benchmark figure was measured on: device, versions, commit. Every printed or saved figure carries it."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..version import __version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or cpu_model() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or '' where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def device_slug(device: torch.device) -> str:
    """A file-system-safe name of the device model, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-x86_64``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9_.]+", "-", name.lower()).strip("-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime"),
        "cuda": torch.version.cuda,
        "fastseg": __version__,
        "fastseg_commit": git_commit(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "<unset: spinning>"),
    }
    if device.type == "cuda":
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["driver"] = _nvidia_driver()
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def case_extra_info(case, provider: str, device: torch.device) -> dict[str, Any]:
    """`extra_info` of one pytest-benchmark case: the environment plus the case's shape, dtype and work."""
    info = environment_info(device)
    info.update(
        family=case.family,
        op=case.op,
        mode=case.mode,
        shape=case.shape_id,
        dtype=str(case.dtype).replace("torch.", ""),
        provider=provider,
        flops=case.flops,
        min_bytes=case.min_bytes,
    )
    return info


if __name__ == "__main__":  # `python -m fastseg.bench.env` prints this device's results folder name
    print(device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
