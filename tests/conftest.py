"""Test set-up: Triton's interpreter on CPU-only machines, seeds, and the gpu / tensorrt skips."""

import os

# OpenMP threads that spin while waiting make a 2-core machine crawl as soon as a second process runs (the DDP tests
# spawn two; measured here: a ResNet-18 training step went from 0.56 s to 7 s). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before fastseg.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt

        has_trt = hasattr(tensorrt, "Builder")  # not a stubs-only `tensorrt` folder importing as a namespace package
    except ImportError:
        has_trt = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible (torch.cuda.is_available() is False)")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (`import tensorrt` failed; it cannot be installed on this machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def _seed_and_fp32():
    torch.manual_seed(0)
    # Exact fp32 references on GPU: TF32 would blur the comparisons.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
