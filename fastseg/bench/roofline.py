"""Device peaks and roofline fractions.

A figure is only meaningful beside the limit it is measured against: every kernel case records the fewest bytes it
must move and its FLOPs, and this module turns a time into GB/s, TFLOP/s and the fraction of the device's peak.
GPU peaks are datasheet numbers (dense, no sparsity); on a CPU the bandwidth and the fp32 matmul rate are measured
once per process, since no datasheet describes a shared cloud vCPU.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch

__all__ = ["DevicePeak", "DEVICE_PEAKS", "peak_for", "roofline_fraction"]


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    name: str
    hbm_gbps: float  # memory bandwidth, GB/s
    bf16_tflops: float  # dense tensor-core bf16/fp16 peak
    fp32_tflops: float  # non-tensor-core fp32 peak
    source: str
    measured: bool = False


# Keys are matched as lower-case substrings of torch.cuda.get_device_name(); the first match wins, so the more
# specific names come first.
DEVICE_PEAKS: list[tuple[str, DevicePeak]] = [
    (
        "h200",
        DevicePeak(
            "NVIDIA H200 SXM", 4800, 989.4, 66.9, "NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s; compute as H100 SXM)"
        ),
    ),
    (
        "h100 pcie",
        DevicePeak(
            "NVIDIA H100 PCIe",
            2000,
            756.0,
            51.0,
            "NVIDIA H100 datasheet, PCIe column (HBM2e 2.0 TB/s; sparse figures halved)",
        ),
    ),
    (
        "h100",
        DevicePeak(
            "NVIDIA H100 SXM5",
            3350,
            989.4,
            66.9,
            "NVIDIA H100 datasheet, SXM column (HBM3 3.35 TB/s; sparse figures halved)",
        ),
    ),
    ("a100-sxm4-40gb", DevicePeak("NVIDIA A100 SXM4 40GB", 1555, 312.0, 19.5, "NVIDIA A100 datasheet")),
    ("a100", DevicePeak("NVIDIA A100 80GB", 2039, 312.0, 19.5, "NVIDIA A100 datasheet (80GB SXM4, HBM2e)")),
    ("l4", DevicePeak("NVIDIA L4", 300, 121.0, 30.3, "NVIDIA L4 datasheet (GDDR6 300 GB/s; sparse figures halved)")),
    (
        "orin nano",
        DevicePeak(
            "Jetson Orin Nano 8GB (Super)",
            102,
            17.0,
            2.1,
            "Jetson Orin Nano Super datasheet (LPDDR5 102 GB/s); FP16 TC derived from sparse INT8 TOPS",
        ),
    ),
    (
        "orin",
        DevicePeak(
            "Jetson AGX Orin 64GB",
            204.8,
            42.5,
            5.3,
            "Jetson AGX Orin data sheet DS-10662-001 (LPDDR5 204.8 GB/s); FP16 TC derived from 170 sparse INT8 TOPS",
        ),
    ),
]


@functools.lru_cache(maxsize=1)
def _measured_cpu_peak() -> DevicePeak:
    # Bandwidth: a 256 MiB copy reads and writes every byte once (best of 5).
    n = 64 * 2**20
    src, dst = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    src.fill_(1.0)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    gbps = 2 * n * 4 / best / 1e9
    # fp32 matmul rate (best of 5) at a size large enough to be compute-bound.
    a = torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    tflops = 2 * 1024**3 / best / 1e12
    return DevicePeak(
        f"CPU ({torch.get_num_threads()} threads)",
        gbps,
        tflops,
        tflops,
        "measured in-process: 256 MiB copy bandwidth and a 1024^3 fp32 matmul",
        measured=True,
    )


def peak_for(device: torch.device) -> DevicePeak | None:
    """The peak of ``device``: the datasheet entry for a known GPU, a measurement for the CPU, else None."""
    if device.type == "cpu":
        return _measured_cpu_peak()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, peak in DEVICE_PEAKS:
            if key in name:
                return peak
    return None


def roofline_fraction(
    seconds: float, flops: float, min_bytes: float, peak: DevicePeak | None, dtype: torch.dtype = torch.float32
) -> float | None:
    """Fraction of the roofline bound: ``max(flops / peak_flops, bytes / peak_bw) / seconds``.

    The bound is the time the op would take at the device's limits; 1.0 means running at the limit.
    """
    if peak is None or seconds <= 0:
        return None
    tflops_peak = peak.bf16_tflops if dtype in (torch.float16, torch.bfloat16) else peak.fp32_tflops
    bound = max(flops / (tflops_peak * 1e12) if flops else 0.0, min_bytes / (peak.hbm_gbps * 1e9) if min_bytes else 0.0)
    return bound / seconds if bound > 0 else None
