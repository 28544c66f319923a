"""Tests of `classwise_reduce` / `classwise_mean`: Triton (native on a CUDA host, the interpreter on CPU; see
conftest.py) vs the scatter_add / index_add_ references vs an independent one-hot einsum oracle; edge cases, dtypes,
layouts, NaN / inf, gradients, determinism, bad inputs, opcheck."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastseg.kernels import (
    classwise_masked_recon_loss,
    classwise_mean,
    classwise_reduce,
    classwise_reduce_ref,
)
from fastseg.kernels._utils import resolve_deterministic

from .conftest import IGNORE, assert_nonzero, class_map, triton_backward_context

reduce_mod = importlib.import_module("fastseg.kernels.classwise_reduce")  # the module (the package exports the op)


def naive_reduce(features, labels, masked, num_classes):
    """Independent oracle: one-hot einsum in fp64 (no scatter)."""
    valid = (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), num_classes).double() * valid.unsqueeze(-1)
    parts = torch.stack([onehot * (~masked).unsqueeze(-1), onehot * masked.unsqueeze(-1)], dim=-1)  # B,H,W,K,2
    sums = torch.einsum("bhwkm,bchw->bkmc", parts, features.double())
    return sums, parts.sum((1, 2)).long()


def assert_sums_close(actual, expected, atol=1e-4, rtol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def _inputs(device, batch, channels, height, width, num_classes, masked_frac=0.4, dtype=torch.float32):
    labels = class_map(batch, height, width, num_classes, device=device)
    masked = torch.rand(batch, height, width, device=device) < masked_frac
    features = torch.randn(batch, channels, height, width, device=device).to(dtype)
    return features, labels, masked


@pytest.mark.parametrize("num_classes", [1, 2, 19, 150])
@pytest.mark.parametrize("channels", [3, 64, 256])
def test_reference_matches_independent_oracle(num_classes, channels):
    features, labels, masked = _inputs("cpu", 2, channels, 11, 13, num_classes)
    want_sums, want_counts = naive_reduce(features, labels, masked, num_classes)
    for method in ("scatter_add", "index_add"):
        sums, counts = classwise_reduce_ref(features, labels, masked, num_classes, method=method)
        assert sums.dtype == torch.float32 and counts.dtype == torch.int64
        assert sums.shape == (2, num_classes, 2, channels) and sums.is_contiguous()
        assert torch.equal(counts, want_counts)
        assert_sums_close(sums, want_sums)


@pytest.mark.interpreter
@pytest.mark.parametrize("num_classes", [1, 2, 19, 150])
@pytest.mark.parametrize("channels", [3, 64, 256])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_matches_reference(num_classes, channels, deterministic, triton_device):
    features, labels, masked = _inputs(triton_device, 2, channels, 11, 13, num_classes)
    sums, counts = classwise_reduce(features, labels, masked, num_classes, deterministic=deterministic, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, num_classes)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)
    if num_classes > 2:  # classes absent from image 0 give exact zeros
        assert torch.equal(sums[0, 2:], torch.zeros_like(sums[0, 2:]))


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", [(1, 40, 13, 37, 150), (2, 70, 9, 31, 19)])
def test_triton_gpu_tiling(monkeypatch, deterministic, shape, triton_device):
    """The GPU tiling (several splits, group blocks and channel blocks, skipped tiles), under the interpreter too."""
    monkeypatch.setattr(reduce_mod, "_GPU_TILING_IN_INTERPRETER", True)
    batch, channels, height, width, num_classes = shape
    features, labels, masked = _inputs(triton_device, batch, channels, height, width, num_classes, masked_frac=0.5)
    sums, counts = classwise_reduce(features, labels, masked, num_classes, deterministic=deterministic, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, num_classes)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)


@pytest.mark.interpreter
@pytest.mark.parametrize("capability, block_g", [((8, 0), 32), ((9, 0), 64)])
def test_triton_gpu_tiling_half_per_architecture(monkeypatch, capability, block_g, triton_device):
    """fp16 at the GPU tiles of each architecture's config (sm_90: 64-group tiles, the M tile wgmma needs)."""
    from fastseg.kernels._utils import GpuTarget, planning_target

    monkeypatch.setattr(reduce_mod, "_GPU_TILING_IN_INTERPRETER", True)
    features, labels, masked = _inputs(triton_device, 1, 40, 13, 37, 150, masked_frac=0.5, dtype=torch.float16)
    with planning_target(GpuTarget(capability, 132, 227 * 1024)):  # read on CPU tensors only (CUDA: the device's)
        if triton_device.type == "cpu":
            assert reduce_mod._reduce_config(40, 300, torch.float16, triton_device)["BLOCK_G"] == block_g
        sums, counts = classwise_reduce(features, labels, masked, 150, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, 150)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)  # one-hot x half is exact, both accumulate in fp32


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["all_ignored", "single_pixel", "empty_batch", "empty_image", "zero_channels"])
def test_triton_edge_cases(case, triton_device):
    shapes = {
        "all_ignored": (2, 8, 5, 7),
        "single_pixel": (1, 3, 1, 1),
        "empty_batch": (0, 4, 5, 5),
        "empty_image": (2, 4, 0, 5),
        "zero_channels": (2, 0, 3, 3),
    }
    batch, channels, height, width = shapes[case]
    dev = triton_device
    features = torch.randn(batch, channels, height, width, device=dev, requires_grad=True)
    labels = (
        torch.full((batch, height, width), IGNORE, device=dev)
        if case == "all_ignored"
        else torch.randint(0, 3, (batch, height, width), device=dev)
    )
    masked = torch.ones(batch, height, width, dtype=torch.bool, device=dev)
    with triton_backward_context(dev):
        sums, counts = classwise_reduce(features, labels, masked, 3, impl="triton")
        sums.sum().backward()
    want_sums, want_counts = classwise_reduce_ref(features.detach(), labels, masked, 3)
    assert sums.shape == (batch, 3, 2, channels) and counts.shape == (batch, 3, 2)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)
    expected_grad = (labels != IGNORE).unsqueeze(1).expand_as(features).float()
    assert torch.equal(features.grad, expected_grad)
    means = classwise_mean(sums, counts)
    assert torch.isfinite(means).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
def test_triton_dtypes(dtype, label_dtype, triton_device):
    features, labels, masked = _inputs(triton_device, 2, 24, 9, 11, 7, masked_frac=0.5, dtype=dtype)
    labels = labels.to(label_dtype)
    sums, counts = classwise_reduce(features, labels, masked, 7, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, 7)
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)  # one-hot x half is exact, both accumulate in fp32


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_triton_strided_inputs(layout, triton_device):
    dev = triton_device
    base = torch.randn(2, 16, 10, 12, device=dev)
    features = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "sliced": torch.randn(2, 20, 12, 14, device=dev)[:, 2:18, 1:11, 2:],
        "expanded": torch.randn(2, 16, 1, 12, device=dev).expand(2, 16, 10, 12),
    }[layout]
    labels = class_map(2, 10, 12, 5, device=dev).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    masked = torch.rand(2, 12, 10, device=dev).transpose(1, 2) < 0.5
    sums, counts = classwise_reduce(features, labels, masked, 5, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features.contiguous(), labels.contiguous(), masked.contiguous(), 5)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_nan_inf_features(deterministic, triton_device):
    """The documented policy. Ignored pixels' features are never read: NaN / inf there change nothing, in both
    paths, exactly. A non-finite feature of a labelled pixel makes its own group's sum non-finite in both paths;
    counts agree exactly; every finite Triton sum equals the reference's."""
    features, labels, masked = _inputs(triton_device, 2, 20, 11, 13, 5)
    ignored = labels == IGNORE
    assert bool(ignored.any())
    poisoned = features.clone()
    poisoned[:, 0][ignored] = float("nan")
    poisoned[:, 1][ignored] = float("inf")
    sums, counts = classwise_reduce(poisoned, labels, masked, 5, deterministic=deterministic, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, 5)
    assert torch.equal(counts, want_counts)
    assert bool(torch.isfinite(sums).all())
    assert_sums_close(sums, want_sums)
    assert_sums_close(classwise_reduce_ref(poisoned, labels, masked, 5)[0], want_sums)  # the reference agrees
    # a labelled pixel: image 1, row 4, column 6
    labels[1, 4, 6], masked[1, 4, 6] = 3, True
    features[1, 2, 4, 6], features[1, 5, 4, 6] = float("nan"), float("-inf")
    sums, counts = classwise_reduce(features, labels, masked, 5, deterministic=deterministic, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, 5)
    assert torch.equal(counts, want_counts)
    assert torch.isnan(want_sums[1, 3, 1, 2]) and torch.isnan(sums[1, 3, 1, 2])
    assert want_sums[1, 3, 1, 5] == float("-inf") and not torch.isfinite(sums[1, 3, 1, 5])
    ref_bad = ~torch.isfinite(want_sums)
    assert int(ref_bad.sum()) == 2 and bool((~torch.isfinite(sums))[ref_bad].all())
    finite = torch.isfinite(sums)
    assert_sums_close(sums[finite], want_sums[finite])


def test_reference_gradcheck():
    labels = class_map(2, 5, 6, 4)
    masked = torch.rand(2, 5, 6) < 0.5
    features = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    for method in ("scatter_add", "index_add"):
        assert torch.autograd.gradcheck(
            lambda f, m=method: classwise_reduce_ref(f, labels, masked, 4, method=m)[0], (features,)
        )
    assert torch.autograd.gradcheck(lambda f: classwise_reduce(f, labels, masked, 4)[0], (features,))  # custom op


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_backward_matches_reference(deterministic, triton_device):
    features, labels, masked = _inputs(triton_device, 2, 40, 11, 13, 19, masked_frac=0.5)
    features.requires_grad_()
    weights = torch.randn(2, 19, 2, 40, device=triton_device)
    with triton_backward_context(triton_device):
        sums, counts = classwise_reduce(features, labels, masked, 19, deterministic=deterministic, impl="triton")
        means = classwise_mean(sums, counts)
        (grad,) = torch.autograd.grad((means * weights).sum(), features)
    ref_sums, ref_counts = classwise_reduce_ref(features, labels, masked, 19)
    (ref_grad,) = torch.autograd.grad((classwise_mean(ref_sums, ref_counts) * weights).sum(), features)
    assert_nonzero(ref_grad)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(grad[:, :, labels[0] == IGNORE][0], torch.zeros_like(grad[:, :, labels[0] == IGNORE][0]))


def test_mean_of_absent_groups_is_zero_with_finite_gradient():
    sums = torch.randn(2, 3, 2, 4, requires_grad=True)
    counts = torch.tensor([[[0, 2], [1, 0], [0, 0]], [[3, 3], [0, 1], [2, 0]]])
    means = classwise_mean(sums, counts)
    assert torch.equal(means[counts == 0], torch.zeros_like(means[counts == 0]))
    means.sum().backward()
    assert torch.isfinite(sums.grad).all()
    assert torch.equal(sums.grad[counts == 0], torch.zeros_like(sums.grad[counts == 0]))
    torch.testing.assert_close(sums.grad[counts > 0], (1.0 / counts[counts > 0].float()).unsqueeze(-1).expand(-1, 4))


@pytest.mark.interpreter
def test_deterministic_mode_is_bitwise_reproducible(monkeypatch, triton_device):
    monkeypatch.setattr(reduce_mod, "_GPU_TILING_IN_INTERPRETER", True)  # several splits: the two-pass path proper
    labels = class_map(1, 13, 29, 19, device=triton_device)
    masked = torch.rand(1, 13, 29, device=triton_device) < 0.5
    features = torch.randn(1, 16, 13, 29, device=triton_device) * 1e3
    first = classwise_reduce(features, labels, masked, 19, deterministic=True, impl="triton")
    for _ in range(19):
        again = classwise_reduce(features, labels, masked, 19, deterministic=True, impl="triton")
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_deterministic_none_follows_torch_flag():
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    features = torch.randn(1, 3, 2, 2)
    try:
        torch.use_deterministic_algorithms(True)
        assert resolve_deterministic("op", None, features) is True
    finally:
        torch.use_deterministic_algorithms(False)
    assert resolve_deterministic("op", None, features) is False
    assert resolve_deterministic("op", True, features) is True
    classwise_reduce(features, labels, labels.bool(), 2)  # runs in either mode


def test_fast_mode_raises_the_nondeterminism_alert_on_cuda():
    class CudaLike:  # only is_cuda is consulted; avoids needing a GPU for the alert logic
        is_cuda = True

    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="not deterministic"):
            resolve_deterministic("classwise_reduce", False, CudaLike())
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            assert resolve_deterministic("classwise_reduce", False, CudaLike()) is False
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("bad", [7, -3, 254])
def test_out_of_range_labels_raise_naming_the_value(bad):
    labels = torch.randint(0, 5, (2, 4, 4))
    labels[1, 2, 3] = bad
    labels[0, 0, 0] = IGNORE  # the ignore index itself is fine
    features, masked = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"value {bad}\b"):
        classwise_reduce(features, labels, masked, 5)
    with pytest.raises(ValueError, match=rf"value {bad}\b"):
        classwise_masked_recon_loss(features, features, labels, masked, 5)


def test_bad_inputs_raise_value_errors():
    features, labels = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    masked = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="features must have 4 dimensions"):
        classwise_reduce(features[0], labels, masked, 3)
    with pytest.raises(ValueError, match="labels .* must both have shape"):
        classwise_reduce(features, labels[:, :3], masked, 3)
    with pytest.raises(ValueError, match="masked must be one of"):
        classwise_reduce(features, labels, masked.float(), 3)
    with pytest.raises(ValueError, match="labels must be one of"):
        classwise_reduce(features, labels.float(), masked, 3)
    with pytest.raises(ValueError, match="ignore_index"):
        classwise_reduce(features, labels, masked, 3, ignore_index=1)
    with pytest.raises(ValueError, match="num_classes"):
        classwise_reduce(features, labels, masked, 0)
    with pytest.raises(ValueError, match="impl"):
        classwise_reduce(features, labels, masked, 3, impl="cuda")


@pytest.mark.parametrize("impl", ["auto", "triton"], ids=["reference", "triton"])
def test_opcheck(impl, device):
    labels = class_map(2, 6, 7, 4, device=device)
    masked = torch.rand(2, 6, 7, device=device) < 0.5
    features = torch.randn(2, 5, 6, 7, device=device, requires_grad=True)
    permuted = torch.randn(2, 7, 6, 5, device=device).transpose(1, 3).detach().requires_grad_()  # dense, permuted
    with triton_backward_context(device, impl == "triton"):
        for det, feats in ((False, features), (True, permuted)):
            torch.library.opcheck(torch.ops.fastseg.classwise_reduce.default, (feats, labels, masked, 4, IGNORE, det))
        torch.library.opcheck(
            torch.ops.fastseg.classwise_reduce_backward.default,
            (torch.randn(2, 4, 2, 5, device=device), labels, masked, 5, torch.float32),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_reduce_and_backward(dtype):
    labels = class_map(2, 67, 129, 150, device="cuda")
    masked = torch.rand(2, 67, 129, device="cuda") < 0.5
    features = torch.randn(2, 256, 67, 129, device="cuda", dtype=dtype, requires_grad=True)
    want_sums, want_counts = classwise_reduce_ref(features.detach().double(), labels, masked, 150)
    weights = torch.randn(2, 150, 2, 256, device="cuda")
    for det in (False, True):
        sums, counts = classwise_reduce(features, labels, masked, 150, deterministic=det)
        assert torch.equal(counts, want_counts)
        scale = want_sums.abs().amax().item()
        assert (sums.double() - want_sums).abs().max().item() <= 1e-5 * scale + 1e-4
        (grad,) = torch.autograd.grad((sums * weights).sum(), features)
        (ref_grad,) = torch.autograd.grad(
            (classwise_reduce_ref(features, labels, masked, 150)[0] * weights).sum(), features
        )
        assert_nonzero(ref_grad)
        assert torch.equal(grad, ref_grad)  # a gather: exact


@pytest.mark.gpu
def test_gpu_deterministic_over_20_runs():
    labels = class_map(4, 128, 128, 21, device="cuda")
    masked = torch.rand(4, 128, 128, device="cuda") < 0.5
    features = torch.randn(4, 64, 128, 128, device="cuda")
    first = classwise_reduce(features, labels, masked, 21, deterministic=True)
    for _ in range(19):
        again = classwise_reduce(features, labels, masked, 21, deterministic=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
