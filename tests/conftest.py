"""Test set-up: Triton's interpreter on CPU-only machines, seeds, and the gpu / tensorrt skips."""

import os
import random

# OpenMP threads that spin while waiting make a 2-core machine crawl as soon as a second process runs (the DDP tests
# spawn two; measured here: a ResNet-18 training step went from 0.56 s to 7 s). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before fastseg.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Every test starts from this seed (torch, numpy, python `random`). Run the suite under a few values to find tests
# that pass by luck: `FASTSEG_TEST_SEED=3 python -m pytest ...`; a test that fails under one seed is a defect.
# Test modules that build seeded generators at import time read it back from the environment, normalised here.
TEST_SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))
os.environ["FASTSEG_TEST_SEED"] = str(TEST_SEED)


def pytest_report_header(config):
    return f"fastseg test seed: {TEST_SEED} (set FASTSEG_TEST_SEED to change it)"


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt

        has_trt = hasattr(tensorrt, "Builder")  # not a stubs-only `tensorrt` folder importing as a namespace package
    except ImportError:
        has_trt = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible (torch.cuda.is_available() is False)")
    skip_trt = pytest.mark.skip(
        reason="needs TensorRT (`import tensorrt` failed; it cannot be installed on this machine)"
    )
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def test_seed() -> int:
    """The suite's seed, for module-scoped fixtures (they run before the per-test seeding below)."""
    return TEST_SEED


@pytest.fixture(autouse=True)
def _seed_and_fp32():
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)
    # Exact fp32 references on GPU: TF32 would blur the comparisons.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


class FastsegOpCalls:
    """Counts the ``torch.ops.fastseg.*`` calls made while it is active, split by the path their kernel takes.

    ``triton[name]`` counts the calls whose kernel launches Triton (CUDA tensors, or the interpreter inside
    ``run_triton_on_cpu``), ``reference[name]`` those that run the PyTorch reference. A test that claims a fused path
    ran asserts on ``triton``: a plausible loss value cannot tell the two paths apart. Keyed by the public op names,
    which do not depend on the file an op lives in.
    """

    def __init__(self) -> None:
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        from fastseg.kernels._utils import use_triton

        self.triton: Counter[str] = Counter()
        self.reference: Counter[str] = Counter()
        calls = self

        class _Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func.namespace == "fastseg":
                    first = next(t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
                    name = func.name().split("::", 1)[1]
                    # use_triton() is the test the op's kernel itself makes, in the same context (see kernels/).
                    (calls.triton if use_triton(first) else calls.reference)[name] += 1
                return func(*args, **kwargs)

        self._mode = _Count()

    def __enter__(self) -> "FastsegOpCalls":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


@pytest.fixture
def count_fastseg_ops():
    """``with count_fastseg_ops() as calls: ...`` then assert on ``calls.triton`` / ``calls.reference``."""
    return FastsegOpCalls


def _wake_zero_initialised_scales(model: torch.nn.Module) -> list[str]:
    """Give every all-zero norm scale the value 1 and return their names.

    timm zero-initialises the last norm of each residual branch (``zero_init_last``) and Swin / MiT layer scales may
    start at zero: at initialisation the branch behind such a scale gets an exactly zero gradient, which hides a
    parameter that is really disconnected. Stochastic depth (timm ``DropPath``) is switched off for the same reason.
    A gradient check calls this first so that every path can carry gradient.
    """
    woken = []
    for name, module in model.named_modules():
        # Stochastic depth can drop a residual branch for every sample of a small batch (weaktr_deit_small's last
        # block at the suite's seed): its parameters then get an exactly zero gradient although they are connected.
        if type(module).__name__ == "DropPath" and getattr(module, "drop_prob", 0.0):
            module.drop_prob = 0.0
            woken.append(name)
        weight = getattr(module, "weight", None)
        is_norm = isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm))
        if is_norm and isinstance(weight, torch.nn.Parameter) and not weight.detach().any():
            with torch.no_grad():
                weight.fill_(1.0)
            woken.append(name)
    return woken


def _parameters_without_gradient(model: torch.nn.Module) -> list[str]:
    """Trainable parameters whose gradient is missing, all zero or not finite (call after ``backward``)."""
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0 or not p.grad.isfinite().all())
    ]


@pytest.fixture
def gradient_check():
    """``gradient_check.prepare(model)`` before the forward, ``gradient_check.silent(model)`` after ``backward``."""
    from types import SimpleNamespace

    return SimpleNamespace(prepare=_wake_zero_initialised_scales, silent=_parameters_without_gradient)


@pytest.fixture
def triton_device() -> torch.device:
    """Where ``impl="triton"`` can run: the GPU when there is one, else the CPU through Triton's interpreter.

    On a CUDA host TRITON_INTERPRET stays unset, so a CPU tensor with ``impl="triton"`` is an error there: tests of the
    fused path put their tensors on this device. Skips, with the reason, where neither is available.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    from fastseg.kernels._utils import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("impl='triton' needs a CUDA device or Triton's interpreter (TRITON_INTERPRET=1); neither is here")
    return torch.device("cpu")
