"""Tests of `classwise_masked_recon_loss`: Triton (native on a CUDA host, the interpreter on CPU; see conftest.py) vs
the index_add_ reference vs an independent loop oracle; gradients, NaN / inf, limits, bad inputs, opcheck."""

from __future__ import annotations

import pytest
import torch

from fastseg.kernels import classwise_masked_recon_loss, classwise_masked_recon_loss_ref

from .conftest import IGNORE, assert_nonzero, class_map, triton_backward_context


def naive_recon(pred, target, labels, masked, num_classes, normalize, patch):
    """Independent oracle with explicit Python loops over patches and classes (small sizes only)."""
    pred, target = pred.double().cpu(), target.double().cpu()
    labels, masked = labels.cpu(), masked.cpu()
    batch, _, height, width = pred.shape
    if normalize:
        norm = torch.empty_like(target)
        for top in range(0, height, patch):
            for left in range(0, width, patch):
                block = target[:, :, top : top + patch, left : left + patch]
                flat = block.reshape(batch, -1)
                mean = flat.mean(1)
                var = flat.var(1, unbiased=True) if flat.shape[1] > 1 else torch.zeros_like(mean)
                norm[:, :, top : top + patch, left : left + patch] = (block - mean.view(-1, 1, 1, 1)) / torch.sqrt(
                    var.view(-1, 1, 1, 1) + 1e-6
                )
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


RECON_CASES = [  # (B, C, H, W, K, normalize, patch)
    (2, 3, 13, 17, 5, False, 16),
    (2, 3, 13, 17, 5, True, 5),
    (1, 3, 9, 20, 19, True, 8),
    (2, 1, 7, 5, 150, True, 3),
]


@pytest.mark.parametrize("case", RECON_CASES)
def test_reference_matches_independent_oracle(case):
    batch, channels, height, width, num_classes, normalize, patch = case
    pred, target = torch.randn(batch, channels, height, width), torch.rand(batch, channels, height, width)
    labels = class_map(batch, height, width, num_classes)
    masked = torch.rand(batch, height, width) < 0.6
    per_class, total = classwise_masked_recon_loss_ref(
        pred, target, labels, masked, num_classes, normalize_target=normalize, patch_size=patch
    )
    want_pc, want_total = naive_recon(pred, target, labels, masked, num_classes, normalize, patch)
    torch.testing.assert_close(per_class.double(), want_pc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total.double(), want_total, atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", RECON_CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_loss_and_gradient(case, deterministic, triton_device):
    batch, channels, height, width, num_classes, normalize, patch = case
    dev = triton_device
    pred = torch.randn(batch, channels, height, width, device=dev, requires_grad=True)
    target = torch.rand(batch, channels, height, width, device=dev)
    labels = class_map(batch, height, width, num_classes, device=dev)
    masked = torch.rand(batch, height, width, device=dev) < 0.6
    class_weights = torch.rand(batch, num_classes, device=dev)
    with triton_backward_context(dev):
        per_class, total = classwise_masked_recon_loss(
            pred,
            target,
            labels,
            masked,
            num_classes,
            normalize_target=normalize,
            patch_size=patch,
            deterministic=deterministic,
            impl="triton",
        )
        (grad,) = torch.autograd.grad(total + (per_class * class_weights).sum(), pred)
    pred64 = pred.detach().double().cpu().requires_grad_()
    want_pc, want_total = naive_recon(pred64, target, labels, masked, num_classes, normalize, patch)
    (want_grad,) = torch.autograd.grad(want_total + (want_pc * class_weights.double().cpu()).sum(), pred64)
    assert_nonzero(want_grad)
    torch.testing.assert_close(per_class.double().cpu(), want_pc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total.double().cpu(), want_total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), want_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_loss_without_masked_pixels_is_zero_with_zero_grad(impl, device):
    pred = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    labels = torch.randint(0, 4, (2, 5, 6), device=device)
    masked = torch.zeros(2, 5, 6, dtype=torch.bool, device=device)
    masked[1, 0, 0] = True
    labels[1, 0, 0] = IGNORE  # the only masked pixel is unlabelled
    with triton_backward_context(device, impl == "triton"):
        per_class, total = classwise_masked_recon_loss(pred, torch.randn(2, 3, 5, 6, device=device), labels, masked,
                                                       4, impl=impl)  # fmt: skip
        total.backward()
    assert total.item() == 0.0 and torch.equal(per_class, torch.zeros(2, 4, device=device))
    assert torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize(
    "where", ["pred_selected", "pred_unmasked", "pred_ignored", "target_selected", "target_unmasked"]
)
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_nan_inf_follow_the_reference(where, normalize, triton_device):
    """The documented policy, gradients included: a non-finite value at a masked, labelled pixel poisons its group
    (and, through the normalisation, its patch); at other pixels it is never selected (zero gradient there)."""
    dev = triton_device
    pred = torch.randn(2, 3, 12, 10, device=dev)
    target = torch.rand(2, 3, 12, 10, device=dev)
    labels = class_map(2, 12, 10, 4, ignore_frac=0.0, device=dev)
    masked = torch.rand(2, 12, 10, device=dev) < 0.5
    labels[1, 5, 5], masked[1, 5, 5] = 2, True  # a masked, labelled pixel
    masked[1, 5, 6] = False  # an unmasked one
    labels[1, 6, 5], masked[1, 6, 5] = IGNORE, True  # an ignored one
    pixel = {"selected": (5, 5), "unmasked": (5, 6), "ignored": (6, 5)}[where.split("_")[1]]
    tensor = pred if where.startswith("pred") else target
    tensor[1, 0, pixel[0], pixel[1]] = float("nan")
    tensor[1, 2, pixel[0], pixel[1]] = float("inf")
    results = []
    for impl in ("triton", "torch"):
        leaf = pred.clone().requires_grad_()
        with triton_backward_context(dev, impl == "triton"):
            per_class, total = classwise_masked_recon_loss(leaf, target, labels, masked, 4, normalize_target=normalize,
                                                           patch_size=4, impl=impl)  # fmt: skip
            (grad,) = torch.autograd.grad(total, leaf)
        results.append((per_class, total, grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    per_class, total, grad = results[1]
    selected = where.endswith("selected")
    # the normalisation spreads a non-finite target over its patch, which holds the masked pixel (5, 5) of class 2
    poisoned = selected or (normalize and where.startswith("target"))
    assert bool(torch.isfinite(total)) != poisoned
    assert bool(torch.isfinite(per_class[1, 2])) != poisoned
    assert bool(torch.isfinite(per_class[0]).all())  # image 0 is untouched
    if not poisoned:
        assert bool(torch.isfinite(grad).all())
    if not selected:  # an unselected pixel gets an exact zero gradient, whatever its values
        assert torch.equal(grad[1, :, pixel[0], pixel[1]], torch.zeros(3, device=dev))


def test_channel_limit_of_triton_path():
    pred, labels = torch.randn(1, 20, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    masked = torch.ones(1, 4, 4, dtype=torch.bool)
    with triton_backward_context(torch.device("cpu")):  # impl="auto" falls back to the reference beyond the limits
        _, total = classwise_masked_recon_loss(pred, pred + 1, labels, masked, 1)
    assert total.item() == pytest.approx(1.0)


def test_triton_refuses_shapes_beyond_its_limits(triton_device):
    pred = torch.randn(1, 20, 4, 4, device=triton_device)
    labels = torch.zeros(1, 4, 4, dtype=torch.long, device=triton_device)
    masked = torch.ones(1, 4, 4, dtype=torch.bool, device=triton_device)
    with pytest.raises(ValueError, match="at most 16 channels"):
        classwise_masked_recon_loss(pred, pred, labels, masked, 1, impl="triton")
    with pytest.raises(ValueError, match="patch_size=100"):
        classwise_masked_recon_loss(pred[:, :3], pred[:, :3], labels, masked, 1, normalize_target=True,
                                    patch_size=100, impl="triton")  # fmt: skip


def test_gradcheck_and_target_gets_no_gradient():
    labels = class_map(1, 5, 6, 3)
    masked = torch.rand(1, 5, 6) < 0.7
    pred = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda p: classwise_masked_recon_loss(p, target, labels, masked, 3, normalize_target=True, patch_size=2)[1]
    assert torch.autograd.gradcheck(fn, (pred,))
    fn(pred).backward()
    assert target.grad is None
    assert_nonzero(pred.grad)


def test_bad_inputs_raise_value_errors():
    features, labels = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    masked = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        classwise_masked_recon_loss(features, features[:, :2], labels, masked, 3)
    with pytest.raises(ValueError, match="patch_size"):
        classwise_masked_recon_loss(features, features, labels, masked, 3, patch_size=0)
    with pytest.raises(ValueError, match="pred must have 4 dimensions"):
        classwise_masked_recon_loss(features[0], features, labels, masked, 3)


@pytest.mark.parametrize("impl", ["auto", "triton"], ids=["reference", "triton"])
def test_opcheck(impl, device):
    labels = class_map(2, 6, 7, 4, device=device)
    masked = torch.rand(2, 6, 7, device=device) < 0.5
    pred = torch.randn(2, 3, 6, 7, device=device, requires_grad=True)
    target = torch.randn(2, 3, 6, 7, device=device)
    with triton_backward_context(device, impl == "triton"):
        for det, norm in ((False, True), (True, False)):
            torch.library.opcheck(
                torch.ops.fastseg.classwise_masked_recon_loss.default,
                (pred, target, labels, masked, 4, IGNORE, norm, 4, det),
            )
        torch.library.opcheck(
            torch.ops.fastseg.classwise_masked_recon_loss_backward.default,
            (torch.randn(2, 4, device=device), pred.detach(), target, labels, masked, True, 4),
        )


@pytest.mark.gpu
def test_gpu_recon_loss():
    labels = class_map(4, 128, 128, 21, device="cuda")
    masked = torch.rand(4, 128, 128, device="cuda") < 0.5
    pred = torch.randn(4, 3, 128, 128, device="cuda", requires_grad=True)
    target = torch.rand(4, 3, 128, 128, device="cuda")
    for det in (False, True):
        per_class, total = classwise_masked_recon_loss(
            pred, target, labels, masked, 21, normalize_target=True, deterministic=det
        )
        want_pc, want_total = classwise_masked_recon_loss_ref(
            pred.double(), target.double(), labels, masked, 21, normalize_target=True
        )
        torch.testing.assert_close(per_class.double(), want_pc.detach(), atol=1e-4, rtol=1e-4)
        (grad,) = torch.autograd.grad(total, pred)
        (want_grad,) = torch.autograd.grad(want_total, pred)
        assert_nonzero(want_grad)
        torch.testing.assert_close(grad, want_grad.float(), atol=1e-7, rtol=1e-4)
