"""Model throughput benchmarks: every registered model x provider (eager reference, fused kernels, torch.compile,
ONNX Runtime) at one size and batch. Uses the same provider factories as `fastseg bench --models`.

Size and batch: FASTSEG_BENCH_SIZE (default 512; 64 in smoke mode) and FASTSEG_BENCH_BATCH (default 1).
Full-size models are slow on a CPU; select with -k, e.g. `-k "fpn_resnet18 or ecenet_resnet50"`.
"""

import os

import pytest
import torch

import fastseg
from fastseg.bench.core import ProviderUnavailable, synchronize
from fastseg.bench.env import environment_info
from fastseg.bench.runner import MODEL_PROVIDERS, model_provider

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_SMOKE = os.environ.get("FASTSEG_BENCH_SMOKE") == "1"
_SIZE = 64 if _SMOKE else int(os.environ.get("FASTSEG_BENCH_SIZE", "512"))
_BATCH = int(os.environ.get("FASTSEG_BENCH_BATCH", "1"))
# Full-size models, torch.compile and ONNX export of every model would take far too long on a 2-core CPU: the smoke
# run executes the eager and fused providers of each method's small CPU model (the contract tests build every
# registered model) and all providers on the smallest one.
_SMOKE_MODELS = ("*resnet18", "*mit_b0")
_SMOKE_ALL_PROVIDERS = "fpn_mit_b0"


def _params():
    small = set(fastseg.list_models(list(_SMOKE_MODELS)))
    for name in fastseg.list_models():
        for provider in MODEL_PROVIDERS:
            marks = []
            if _SMOKE and name not in small:
                marks.append(pytest.mark.skip(reason="smoke run: only the small CPU model of each method"))
            elif _SMOKE and provider not in ("eager", "fused") and name != _SMOKE_ALL_PROVIDERS:
                marks.append(pytest.mark.skip(reason="smoke run: compile / ONNX providers only on the smallest model"))
            yield pytest.param(name, provider, id=f"{name}-{provider}-B{_BATCH}-{_SIZE}", marks=marks)


@pytest.mark.parametrize("name, provider", list(_params()))
def test_model(benchmark, name, provider):
    images = torch.randn(_BATCH, 3, _SIZE, _SIZE, device=_DEVICE)
    try:
        fn = model_provider(name, provider, _DEVICE, images, num_classes=None)
    except ProviderUnavailable as why:
        pytest.skip(str(why))

    def synced():
        out = fn()
        synchronize(_DEVICE)
        return out

    benchmark.extra_info.update(environment_info(_DEVICE))
    benchmark.extra_info.update(model=name, provider=provider, batch=_BATCH, size=_SIZE, dtype="float32")
    warmup, rounds = (0, 1) if _SMOKE else (3, 20)
    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = _BATCH / benchmark.stats.stats.median
