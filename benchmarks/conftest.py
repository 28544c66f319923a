"""pytest-benchmark set-up for fastseg: device-aware machine info, smoke mode, and per-device result storage.

Run:   pytest benchmarks/ --benchmark-autosave --benchmark-storage=benchmarks/results/<device-slug>
Smoke: FASTSEG_BENCH_SMOKE=1 pytest benchmarks/ --benchmark-disable   (every case once, tiny shapes; CI)
"""

import os

if os.environ.get("FASTSEG_BENCH_SMOKE") == "1":
    # Smoke runs are correctness runs: avoid OpenMP spin-waiting, which crawls beside any other process (tests/conftest.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("FASTSEG_BENCH_SMOKE") == "1":
    # Smoke runs on CPU exercise the Triton providers through the interpreter; timed runs on CPU skip them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastseg.bench.env import device_slug, environment_info  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastseg"] = environment_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    # Refuse cross-device comparisons: a baseline is only meaningful on the same GPU (or CPU) model.
    here = machine_info.get("fastseg", {}).get("device_slug")
    there = compared_benchmark.get("machine_info", {}).get("fastseg", {}).get("device_slug")
    if here and there and here != there:
        pytest.exit(f"refusing to compare benchmarks of {here} with a baseline from {there}", returncode=4)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def smoke() -> bool:
    return os.environ.get("FASTSEG_BENCH_SMOKE") == "1"


def pytest_report_header(config):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"fastseg benchmarks on {device_slug(dev)} (results dir: benchmarks/results/{device_slug(dev)})"
