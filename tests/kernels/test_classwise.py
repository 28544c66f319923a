"""Tests of the `classwise` kernel family: Triton (interpreter on CPU, compiled on GPU) vs the index_add_ references
vs plain PyTorch computations written independently here; gradients, determinism, bad inputs, opcheck."""

from __future__ import annotations

import fastseg.kernels.classwise as cw
import pytest
import torch
import torch.nn.functional as F
from fastseg.kernels import (
    classwise_masked_recon_loss,
    classwise_masked_recon_loss_ref,
    classwise_mean,
    classwise_patch_mask,
    classwise_reduce,
    classwise_reduce_ref,
)
from fastseg.kernels._utils import interpreter_enabled, run_triton_on_cpu

IGNORE = 255
needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (set by conftest)")


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------
def class_map(batch: int, height: int, width: int, num_classes: int, ignore_frac: float = 0.2,
              absent: bool = True, device: str = "cpu") -> torch.Tensor:
    """Blocky random class maps (regions, like real segmentation) with ignore pixels; image 0 uses only a few
    classes so that most classes are absent from it."""
    coarse = torch.randint(0, num_classes, (batch, 1, (height + 3) // 4, (width + 3) // 4)).float()
    labels = F.interpolate(coarse, size=(height, width), mode="nearest")[:, 0].long()
    noise = torch.rand(batch, height, width) < 0.1  # a few isolated pixels of other classes
    labels = torch.where(noise, torch.randint(0, num_classes, (batch, height, width)), labels)
    if absent and num_classes > 2:
        labels[0] = labels[0] % 2
    labels[torch.rand(batch, height, width) < ignore_frac] = IGNORE
    return labels.to(device)


def naive_reduce(features, labels, masked, num_classes):
    """Independent oracle: one-hot einsum in fp64 (no scatter)."""
    valid = (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), num_classes).double() * valid.unsqueeze(-1)
    parts = torch.stack([onehot * (~masked).unsqueeze(-1), onehot * masked.unsqueeze(-1)], dim=-1)  # B,H,W,K,2
    sums = torch.einsum("bhwkm,bchw->bkmc", parts, features.double())
    return sums, parts.sum((1, 2)).long()


def naive_recon(pred, target, labels, masked, num_classes, normalize, patch):
    """Independent oracle with explicit Python loops over patches and classes (small sizes only)."""
    pred, target = pred.double(), target.double()
    batch, _, height, width = pred.shape
    if normalize:
        norm = torch.empty_like(target)
        for top in range(0, height, patch):
            for left in range(0, width, patch):
                block = target[:, :, top:top + patch, left:left + patch]
                flat = block.reshape(batch, -1)
                mean = flat.mean(1)
                var = flat.var(1, unbiased=True) if flat.shape[1] > 1 else torch.zeros_like(mean)
                norm[:, :, top:top + patch, left:left + patch] = (block - mean.view(-1, 1, 1, 1)) / torch.sqrt(
                    var.view(-1, 1, 1, 1) + 1e-6)
        target = norm
    per_class = torch.zeros(batch, num_classes, dtype=torch.float64)
    present = 0
    for b in range(batch):
        for k in range(num_classes):
            sel = masked[b] & (labels[b] == k)
            if sel.any():
                per_class[b, k] = ((pred[b][:, sel] - target[b][:, sel]) ** 2).mean()
                present += 1
    return per_class, per_class.sum() / max(present, 1)


def assert_sums_close(actual, expected, atol=1e-4, rtol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------------------------
# classwise_reduce
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [1, 2, 19, 150])
@pytest.mark.parametrize("channels", [3, 64, 256])
def test_reference_matches_independent_oracle(num_classes, channels):
    labels = class_map(2, 11, 13, num_classes)
    masked = torch.rand(2, 11, 13) < 0.4
    features = torch.randn(2, channels, 11, 13)
    want_sums, want_counts = naive_reduce(features, labels, masked, num_classes)
    for method in ("scatter_add", "index_add"):
        sums, counts = classwise_reduce_ref(features, labels, masked, num_classes, method=method)
        assert sums.dtype == torch.float32 and counts.dtype == torch.int64
        assert sums.shape == (2, num_classes, 2, channels) and sums.is_contiguous()
        assert torch.equal(counts, want_counts)
        assert_sums_close(sums, want_sums)


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("num_classes", [1, 2, 19, 150])
@pytest.mark.parametrize("channels", [3, 64, 256])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_reduce_matches_reference(num_classes, channels, deterministic):
    labels = class_map(2, 11, 13, num_classes)
    masked = torch.rand(2, 11, 13) < 0.4
    features = torch.randn(2, channels, 11, 13)
    sums, counts = classwise_reduce(features, labels, masked, num_classes, deterministic=deterministic,
                                    impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, num_classes)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)
    if num_classes > 2:  # classes absent from image 0 give exact zeros
        assert torch.equal(sums[0, 2:], torch.zeros_like(sums[0, 2:]))


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", [(1, 40, 13, 37, 150), (2, 70, 9, 31, 19)])
def test_triton_reduce_gpu_tiling(monkeypatch, deterministic, shape):
    """The GPU tiling (several splits, group blocks and channel blocks, skipped tiles) under the interpreter."""
    monkeypatch.setattr(cw, "_GPU_TILING_IN_INTERPRETER", True)
    batch, channels, height, width, num_classes = shape
    labels = class_map(batch, height, width, num_classes)
    masked = torch.rand(batch, height, width) < 0.5
    features = torch.randn(batch, channels, height, width)
    sums, counts = classwise_reduce(features, labels, masked, num_classes, deterministic=deterministic,
                                    impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, num_classes)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["all_ignored", "single_pixel", "empty_batch", "empty_image", "zero_channels"])
def test_triton_reduce_edge_cases(case):
    shapes = {"all_ignored": (2, 8, 5, 7), "single_pixel": (1, 3, 1, 1), "empty_batch": (0, 4, 5, 5),
              "empty_image": (2, 4, 0, 5), "zero_channels": (2, 0, 3, 3)}
    batch, channels, height, width = shapes[case]
    features = torch.randn(batch, channels, height, width, requires_grad=True)
    labels = torch.full((batch, height, width), IGNORE) if case == "all_ignored" else \
        torch.randint(0, 3, (batch, height, width))
    masked = torch.ones(batch, height, width, dtype=torch.bool)
    with run_triton_on_cpu():
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


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
def test_triton_reduce_dtypes(dtype, label_dtype):
    labels = class_map(2, 9, 11, 7).to(label_dtype)
    masked = torch.rand(2, 9, 11) < 0.5
    features = torch.randn(2, 24, 9, 11).to(dtype)
    sums, counts = classwise_reduce(features, labels, masked, 7, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features, labels, masked, 7)
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)  # one-hot x half is exact, both accumulate in fp32


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_triton_reduce_strided_inputs(layout):
    base = torch.randn(2, 16, 10, 12)
    features = {"channels_last": base.to(memory_format=torch.channels_last),
                "sliced": torch.randn(2, 20, 12, 14)[:, 2:18, 1:11, 2:],
                "expanded": torch.randn(2, 16, 1, 12).expand(2, 16, 10, 12)}[layout]
    labels = class_map(2, 10, 12, 5).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous labels
    masked = torch.rand(2, 12, 10).transpose(1, 2) < 0.5
    sums, counts = classwise_reduce(features, labels, masked, 5, impl="triton")
    want_sums, want_counts = classwise_reduce_ref(features.contiguous(), labels.contiguous(), masked.contiguous(), 5)
    assert torch.equal(counts, want_counts)
    assert_sums_close(sums, want_sums)


def test_reference_gradcheck():
    labels = class_map(2, 5, 6, 4)
    masked = torch.rand(2, 5, 6) < 0.5
    features = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    for method in ("scatter_add", "index_add"):
        assert torch.autograd.gradcheck(lambda f, m=method: classwise_reduce_ref(f, labels, masked, 4, method=m)[0],
                                        (features,))
    assert torch.autograd.gradcheck(lambda f: classwise_reduce(f, labels, masked, 4)[0], (features,))  # custom op


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_reduce_backward_matches_reference(deterministic):
    labels = class_map(2, 11, 13, 19)
    masked = torch.rand(2, 11, 13) < 0.5
    features = torch.randn(2, 40, 11, 13, requires_grad=True)
    weights = torch.randn(2, 19, 2, 40)
    with run_triton_on_cpu():
        sums, counts = classwise_reduce(features, labels, masked, 19, deterministic=deterministic, impl="triton")
        means = classwise_mean(sums, counts)
        grad, = torch.autograd.grad((means * weights).sum(), features)
    ref_sums, ref_counts = classwise_reduce_ref(features, labels, masked, 19)
    ref_grad, = torch.autograd.grad((classwise_mean(ref_sums, ref_counts) * weights).sum(), features)
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


@needs_interpreter
@pytest.mark.interpreter
def test_deterministic_mode_is_bitwise_reproducible(monkeypatch):
    monkeypatch.setattr(cw, "_GPU_TILING_IN_INTERPRETER", True)  # several splits: the two-pass path proper
    labels = class_map(1, 13, 29, 19)
    masked = torch.rand(1, 13, 29) < 0.5
    features = torch.randn(1, 16, 13, 29) * 1e3
    first = classwise_reduce(features, labels, masked, 19, deterministic=True, impl="triton")
    for _ in range(19):
        again = classwise_reduce(features, labels, masked, 19, deterministic=True, impl="triton")
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_deterministic_none_follows_torch_flag():
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    features = torch.randn(1, 3, 2, 2)
    try:
        torch.use_deterministic_algorithms(True)
        assert cw._resolve_deterministic("op", None, features) is True
    finally:
        torch.use_deterministic_algorithms(False)
    assert cw._resolve_deterministic("op", None, features) is False
    assert cw._resolve_deterministic("op", True, features) is True
    classwise_reduce(features, labels, labels.bool(), 2)  # runs in either mode


def test_fast_mode_raises_the_nondeterminism_alert_on_cuda():
    class CudaLike:  # only is_cuda is consulted; avoids needing a GPU for the alert logic
        is_cuda = True

    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="not deterministic"):
            cw._resolve_deterministic("classwise_reduce", False, CudaLike())
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            assert cw._resolve_deterministic("classwise_reduce", False, CudaLike()) is False
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
    with pytest.raises(ValueError, match=rf"value {bad}\b"):
        classwise_patch_mask(labels, 2, 0.5, num_classes=5)


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
    with pytest.raises(ValueError, match="same shape"):
        classwise_masked_recon_loss(features, features[:, :2], labels, masked, 3)
    with pytest.raises(ValueError, match="patch_size"):
        classwise_masked_recon_loss(features, features, labels, masked, 3, patch_size=0)
    with pytest.raises(ValueError, match="ratio"):
        classwise_patch_mask(labels, 2, 1.5)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_opcheck(use_triton):
    labels = class_map(2, 6, 7, 4)
    masked = torch.rand(2, 6, 7) < 0.5
    features = torch.randn(2, 5, 6, 7, requires_grad=True)
    permuted = torch.randn(2, 7, 6, 5).transpose(1, 3).detach().requires_grad_()  # dense, permuted layout
    pred, target = torch.randn(2, 3, 6, 7, requires_grad=True), torch.randn(2, 3, 6, 7)
    with run_triton_on_cpu(use_triton):
        for det, feats, norm in ((False, features, True), (True, permuted, False)):
            torch.library.opcheck(torch.ops.fastseg.classwise_reduce.default, (feats, labels, masked, 4, IGNORE, det))
            torch.library.opcheck(torch.ops.fastseg.classwise_masked_recon_loss.default,
                                  (pred, target, labels, masked, 4, IGNORE, norm, 4, det))
        torch.library.opcheck(torch.ops.fastseg.classwise_reduce_backward.default,
                              (torch.randn(2, 4, 2, 5), labels, masked, 5, torch.float32))
        torch.library.opcheck(torch.ops.fastseg.classwise_masked_recon_loss_backward.default,
                              (torch.randn(2, 4), pred.detach(), target, labels, masked, True, 4))


# ------------------------------------------------------------------------------------------------------------------
# classwise_masked_recon_loss
# ------------------------------------------------------------------------------------------------------------------
RECON_CASES = [  # (B, C, H, W, K, normalize, patch)
    (2, 3, 13, 17, 5, False, 16),
    (2, 3, 13, 17, 5, True, 5),
    (1, 3, 9, 20, 19, True, 8),
    (2, 1, 7, 5, 150, True, 3),
]


@pytest.mark.parametrize("case", RECON_CASES)
def test_recon_reference_matches_independent_oracle(case):
    batch, channels, height, width, num_classes, normalize, patch = case
    pred, target = torch.randn(batch, channels, height, width), torch.rand(batch, channels, height, width)
    labels = class_map(batch, height, width, num_classes)
    masked = torch.rand(batch, height, width) < 0.6
    per_class, total = classwise_masked_recon_loss_ref(pred, target, labels, masked, num_classes,
                                                       normalize_target=normalize, patch_size=patch)
    want_pc, want_total = naive_recon(pred, target, labels, masked, num_classes, normalize, patch)
    torch.testing.assert_close(per_class.double(), want_pc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total.double(), want_total, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("case", RECON_CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_recon_loss_and_gradient(case, deterministic):
    batch, channels, height, width, num_classes, normalize, patch = case
    pred = torch.randn(batch, channels, height, width, requires_grad=True)
    target = torch.rand(batch, channels, height, width)
    labels = class_map(batch, height, width, num_classes)
    masked = torch.rand(batch, height, width) < 0.6
    class_weights = torch.rand(batch, num_classes)
    with run_triton_on_cpu():
        per_class, total = classwise_masked_recon_loss(pred, target, labels, masked, num_classes,
                                                       normalize_target=normalize, patch_size=patch,
                                                       deterministic=deterministic, impl="triton")
        grad, = torch.autograd.grad(total + (per_class * class_weights).sum(), pred)
    pred64 = pred.detach().double().requires_grad_()
    want_pc, want_total = naive_recon(pred64, target, labels, masked, num_classes, normalize, patch)
    want_grad, = torch.autograd.grad(want_total + (want_pc * class_weights.double()).sum(), pred64)
    torch.testing.assert_close(per_class.double(), want_pc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total.double(), want_total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "auto", pytest.param("triton", marks=needs_interpreter)])
def test_recon_loss_without_masked_pixels_is_zero_with_zero_grad(impl):
    pred = torch.randn(2, 3, 5, 6, requires_grad=True)
    labels = torch.randint(0, 4, (2, 5, 6))
    masked = torch.zeros(2, 5, 6, dtype=torch.bool)
    masked[1, 0, 0] = True
    labels[1, 0, 0] = IGNORE  # the only masked pixel is unlabelled
    with run_triton_on_cpu(impl == "triton"):
        per_class, total = classwise_masked_recon_loss(pred, torch.randn(2, 3, 5, 6), labels, masked, 4, impl=impl)
        total.backward()
    assert total.item() == 0.0 and torch.equal(per_class, torch.zeros(2, 4))
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_recon_loss_channel_limit_of_triton_path():
    pred, labels = torch.randn(1, 20, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    masked = torch.ones(1, 4, 4, dtype=torch.bool)
    if interpreter_enabled():
        with pytest.raises(ValueError, match="at most 16 channels"):
            classwise_masked_recon_loss(pred, pred, labels, masked, 1, impl="triton")
    with run_triton_on_cpu():  # impl="auto" falls back to the reference for shapes the kernel does not take
        _, total = classwise_masked_recon_loss(pred, pred + 1, labels, masked, 1)
    assert total.item() == pytest.approx(1.0)


def test_recon_gradcheck_and_target_gets_no_gradient():
    labels = class_map(1, 5, 6, 3)
    masked = torch.rand(1, 5, 6) < 0.7
    pred = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda p: classwise_masked_recon_loss(p, target, labels, masked, 3, normalize_target=True, patch_size=2)[1]
    assert torch.autograd.gradcheck(fn, (pred,))
    fn(pred).backward()
    assert target.grad is None


# ------------------------------------------------------------------------------------------------------------------
# classwise_patch_mask
# ------------------------------------------------------------------------------------------------------------------
def patch_owners(labels, patch, num_classes):
    """Independent loop oracle: majority class per patch (ties: smallest id), -1 for all-ignore patches."""
    batch, height, width = labels.shape
    rows, cols = -(-height // patch), -(-width // patch)
    owners = torch.full((batch, rows, cols), -1)
    for b in range(batch):
        for r in range(rows):
            for c in range(cols):
                block = labels[b, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].flatten()
                block = block[block != IGNORE]
                if block.numel():
                    owners[b, r, c] = torch.bincount(block, minlength=num_classes).argmax()
    return owners


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("patch", [1, 4, 5])
def test_patch_mask_respects_class_regions_and_ratio(ratio, patch):
    labels = class_map(3, 23, 30, 6, ignore_frac=0.05)
    labels[2, :10, :10] = IGNORE  # whole all-ignore patches
    masked = classwise_patch_mask(labels, patch, ratio, generator=torch.Generator().manual_seed(1), num_classes=6)
    assert masked.shape == labels.shape and masked.dtype == torch.bool
    owners = patch_owners(labels, patch, 6)
    rows, cols = owners.shape[1:]
    padded = F.pad(masked, (0, cols * patch - 30, 0, rows * patch - 23))
    blocks = padded.view(3, rows, patch, cols, patch).permute(0, 1, 3, 2, 4).reshape(3, rows, cols, -1)
    # a patch is masked as a whole (inside the image) or not at all
    inside = F.pad(torch.ones(23, 30, dtype=torch.bool), (0, cols * patch - 30, 0, rows * patch - 23))
    inside = inside.view(rows, patch, cols, patch).permute(0, 2, 1, 3).reshape(rows, cols, -1)
    patch_masked = blocks.any(-1)
    assert torch.equal(blocks, patch_masked.unsqueeze(-1) & inside)
    assert not patch_masked[owners < 0].any()  # all-ignore patches stay visible
    for b in range(3):
        for k in range(6):
            n = int((owners[b] == k).sum())
            m = int(patch_masked[b][owners[b] == k].sum())
            assert abs(m - ratio * n) < 1.0, (b, k, n, m)


def test_patch_mask_is_reproducible_random_and_handles_edges():
    labels = class_map(2, 16, 16, 4, ignore_frac=0.0)
    gen = lambda seed: torch.Generator().manual_seed(seed)
    first = classwise_patch_mask(labels, 2, 0.5, generator=gen(3))
    assert torch.equal(first, classwise_patch_mask(labels, 2, 0.5, generator=gen(3)))
    assert not torch.equal(first, classwise_patch_mask(labels, 2, 0.5, generator=gen(4)))
    assert not classwise_patch_mask(torch.full((1, 4, 4), IGNORE), 2, 1.0).any()
    assert classwise_patch_mask(torch.zeros(0, 4, 4, dtype=torch.long), 2, 0.5).shape == (0, 4, 4)
    assert classwise_patch_mask(torch.zeros(1, 1, 1, dtype=torch.long), 4, 1.0).all()


# ------------------------------------------------------------------------------------------------------------------
# GPU (compiled Triton; skipped without CUDA)
# ------------------------------------------------------------------------------------------------------------------
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
        grad, = torch.autograd.grad((sums * weights).sum(), features)
        ref_grad, = torch.autograd.grad((classwise_reduce_ref(features, labels, masked, 150)[0] * weights).sum(),
                                        features)
        assert torch.equal(grad, ref_grad)  # a gather: exact


@pytest.mark.gpu
def test_gpu_deterministic_over_20_runs_and_recon_loss():
    labels = class_map(4, 128, 128, 21, device="cuda")
    masked = torch.rand(4, 128, 128, device="cuda") < 0.5
    features = torch.randn(4, 64, 128, 128, device="cuda")
    first = classwise_reduce(features, labels, masked, 21, deterministic=True)
    for _ in range(19):
        again = classwise_reduce(features, labels, masked, 21, deterministic=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    pred = torch.randn(4, 3, 128, 128, device="cuda", requires_grad=True)
    target = torch.rand(4, 3, 128, 128, device="cuda")
    for det in (False, True):
        per_class, total = classwise_masked_recon_loss(pred, target, labels, masked, 21, normalize_target=True,
                                                       deterministic=det)
        want_pc, want_total = classwise_masked_recon_loss_ref(pred.double(), target.double(), labels, masked, 21,
                                                              normalize_target=True)
        torch.testing.assert_close(per_class.double(), want_pc.detach(), atol=1e-4, rtol=1e-4)
        grad, = torch.autograd.grad(total, pred)
        want_grad, = torch.autograd.grad(want_total, pred)
        torch.testing.assert_close(grad, want_grad.float(), atol=1e-7, rtol=1e-4)
