"""Kernel benchmarks: every registered `KernelCase` x provider (fastseg Triton, reference, torch.compile, peers).

The cases live in `fastseg.bench.cases_*` so that `fastseg bench` prints exactly what this suite measures.
"""

import pytest
import torch

from fastseg.bench.core import ProviderUnavailable, kernel_cases, synchronize
from fastseg.bench.env import case_extra_info

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_SMOKE = __import__("os").environ.get("FASTSEG_BENCH_SMOKE") == "1"
_PARAMS = [
    pytest.param(case, provider, id=f"{case.name}-{provider}")
    for case in kernel_cases(_DEVICE, smoke=_SMOKE)
    for provider in case.providers
]


@pytest.mark.parametrize("case, provider", _PARAMS)
def test_kernel(benchmark, case, provider):
    inputs = case.make_inputs(_DEVICE, case.dtype)
    try:
        fn = case.providers[provider](inputs)
    except ProviderUnavailable as why:
        pytest.skip(str(why))

    def synced():
        out = fn()
        synchronize(_DEVICE)
        return out

    benchmark.extra_info.update(case_extra_info(case, provider, _DEVICE))
    warmup, rounds = (0, 1) if _SMOKE else (3, 20)
    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats is not None:  # None with --benchmark-disable
        seconds = benchmark.stats.stats.median
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / seconds / 1e12
        if case.min_bytes:
            benchmark.extra_info["gbps"] = case.min_bytes / seconds / 1e9
