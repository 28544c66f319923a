"""Tests of the S4MIM layers over the `classwise` kernels (masked input builder, recon loss, feature aggregation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg.kernels import classwise_masked_recon_loss
from fastseg.kernels._utils import interpreter_enabled, run_triton_on_cpu
from fastseg.layers.classwise import (
    ClasswiseFeatureAggregationLoss,
    ClasswiseMaskedInput,
    ClasswiseMaskedReconLoss,
    resize_labels,
)

IGNORE = 255


def blocky_labels(batch, height, width, num_classes, block=4):
    coarse = torch.randint(0, num_classes, (batch, 1, -(-height // block), -(-width // block))).float()
    labels = F.interpolate(coarse, scale_factor=block, mode="nearest")[:, 0, :height, :width].long()
    labels[torch.rand(batch, height, width) < 0.1] = IGNORE
    return labels


@pytest.mark.parametrize("fill", ["zero", "mean", "token"])
def test_masked_input_fills_only_masked_pixels(fill):
    images = torch.randn(2, 3, 20, 24)
    labels = blocky_labels(2, 20, 24, 5)
    builder = ClasswiseMaskedInput(patch_size=4, ratio=0.5, fill=fill)
    if fill == "token":
        with torch.no_grad():
            builder.mask_token.copy_(torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))
    out, masked = builder(images, labels, generator=torch.Generator().manual_seed(0))
    assert masked.shape == labels.shape and 0 < masked.float().mean() < 1
    keep = ~masked.unsqueeze(1).expand_as(images)
    assert torch.equal(out[keep], images[keep])
    expected = {
        "zero": torch.zeros(2, 3, 1, 1),
        "mean": images.mean((2, 3), keepdim=True),
        "token": torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1),
    }[fill].expand_as(images)
    assert torch.equal(out[~keep], expected[~keep])


def test_masked_input_token_learns_and_bad_options_raise():
    builder = ClasswiseMaskedInput(patch_size=2, ratio=1.0, fill="token")
    out, masked = builder(torch.randn(1, 3, 6, 6), torch.zeros(1, 6, 6, dtype=torch.long))
    assert masked.all()
    out.sum().backward()
    assert torch.equal(builder.mask_token.grad.flatten(), torch.full((3,), 36.0))
    with pytest.raises(ValueError, match="fill"):
        ClasswiseMaskedInput(fill="noise")
    with pytest.raises(ValueError, match="ratio"):
        ClasswiseMaskedInput(ratio=2.0)
    with pytest.raises(ValueError, match="ownership"):
        ClasswiseMaskedInput(ownership="patch")
    with pytest.raises(ValueError, match="must agree"):
        builder(torch.randn(1, 3, 6, 6), torch.zeros(1, 5, 6, dtype=torch.long))


def naive_aggregation(features, labels, masked, num_classes, distance):
    """Independent oracle: Python loops over images and classes with boolean selections."""
    terms = []
    for b in range(features.shape[0]):
        for k in range(num_classes):
            sel_m = (labels[b] == k) & masked[b]
            sel_v = (labels[b] == k) & ~masked[b]
            if sel_m.any() and sel_v.any():
                mu_m = features[b][:, sel_m].mean(1)
                mu_v = features[b][:, sel_v].mean(1).detach()
                if distance == "cosine":
                    terms.append(1 - torch.dot(mu_m, mu_v) / (mu_m.norm() * mu_v.norm()))
                else:
                    terms.append(((mu_m - mu_v) ** 2).mean())
    return torch.stack(terms).mean() if terms else features.sum() * 0


@pytest.mark.parametrize("distance", ["cosine", "mse"])
@pytest.mark.parametrize(
    "impl",
    [
        "torch",
        "auto",
        pytest.param("triton", marks=pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1")),
    ],
)
def test_feature_aggregation_matches_naive_loops(distance, impl):
    labels = blocky_labels(2, 12, 14, 6)
    labels[1] = labels[1].clamp(max=2)  # classes 3..5 absent from image 1
    masked = torch.rand(2, 12, 14) < 0.5
    features = torch.randn(
        2, 16, 12, 14, dtype=torch.float64 if impl != "triton" else torch.float32, requires_grad=True
    )
    loss_fn = ClasswiseFeatureAggregationLoss(6, distance=distance, impl=impl)
    with run_triton_on_cpu(impl == "triton"):
        loss = loss_fn(features, labels, masked)
        (grad,) = torch.autograd.grad(loss, features)
    want = naive_aggregation(features, labels, masked, 6, distance)
    (want_grad,) = torch.autograd.grad(want, features)
    tol = 1e-10 if features.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss, want, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, want_grad, atol=tol, rtol=1e-5)
    assert torch.isfinite(grad).all() and bool(want_grad.ne(0).any())
    # the visible prototype is a stop-gradient target: visible pixels receive nothing
    assert torch.equal(grad.permute(0, 2, 3, 1)[~masked], torch.zeros_like(grad.permute(0, 2, 3, 1)[~masked]))


def test_feature_aggregation_without_complete_groups_is_zero_and_resizes():
    features = torch.randn(1, 8, 5, 5, requires_grad=True)
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    masked = torch.ones(1, 10, 10, dtype=torch.bool)  # no visible part anywhere
    loss = ClasswiseFeatureAggregationLoss(3)(features, labels, masked)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros_like(features))
    small_labels, small_masked = resize_labels(
        torch.arange(16).view(1, 4, 4), torch.eye(4, dtype=torch.bool)[None], (2, 2)
    )
    assert torch.equal(small_labels, torch.tensor([[[0, 2], [8, 10]]]))
    assert torch.equal(small_masked, torch.tensor([[[True, False], [False, True]]]))
    with pytest.raises(ValueError, match="distance"):
        ClasswiseFeatureAggregationLoss(3, distance="l1")


def test_recon_loss_module_matches_function_and_upsamples():
    target = torch.rand(2, 3, 16, 16)
    labels = blocky_labels(2, 16, 16, 4)
    masked = torch.rand(2, 16, 16) < 0.5
    pred = torch.randn(2, 3, 8, 8, requires_grad=True)
    module = ClasswiseMaskedReconLoss(4, normalize_target=True, patch_size=4)
    loss = module(pred, target, labels, masked)
    up = F.interpolate(pred, size=(16, 16), mode="bilinear", align_corners=False)
    _, want = classwise_masked_recon_loss(
        up, target, labels, masked, 4, normalize_target=True, patch_size=4, impl="torch"
    )
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_s4mim_style_step_lowers_the_losses():
    """A few optimisation steps on a tiny conv net: the recon and (cosine) aggregation losses both go down.

    (With ``distance="mse"`` on raw features the stop-gradient target moves with the network and the feature scale
    can grow; cosine is scale-free, which is why it is the default.)"""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    labels = blocky_labels(2, 16, 16, 3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1)
    )
    head = torch.nn.Conv2d(16, 3, 1)
    builder = ClasswiseMaskedInput(patch_size=4, ratio=0.5)
    recon, agg = ClasswiseMaskedReconLoss(3, patch_size=4), ClasswiseFeatureAggregationLoss(3, distance="cosine")
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    x, masked = builder(images, labels, generator=gen)
    history = []
    for _ in range(30):
        feats = net(x)
        losses = recon(head(feats), images, labels, masked), agg(feats, labels, masked)
        opt.zero_grad()
        sum(losses).backward()
        opt.step()
        history.append([v.item() for v in losses])
        losses = None
    assert history[-1][0] < history[0][0] and history[-1][1] < history[0][1]
