"""Kernel benchmarks: every registered `KernelCase` x provider (fastseg Triton, reference, torch.compile, peers).

The cases live in `fastseg.bench.cases_*` so that `fastseg bench` prints exactly what this suite measures. Every
provider's output is compared with the reference provider's first (`compare_outputs`): a provider that returns a
wrong result fails here, in the smoke run too, instead of being timed.
"""

import pytest
import torch

from fastseg.bench.core import ProviderUnavailable, compare_outputs, kernel_cases, synchronize
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

    if provider != case.reference:
        try:
            ref = case.providers[case.reference](inputs)()
        except ProviderUnavailable as why:
            pytest.skip(f"reference provider {case.reference!r} unavailable: {why}")
        mismatch = compare_outputs(fn(), ref, case.dtype)
        assert mismatch is None, f"{case.name}: provider {provider!r} disagrees with {case.reference!r}: {mismatch}"

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
