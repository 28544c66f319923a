"""S4MIM and its UniMatch base: augmentations, losses against plain PyTorch, class-wise masking, fused vs torch
training step, and the guarantee that unlabelled masks never reach the loss."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import fastseg
from fastseg.data.semi import SemiSupervisedPairs, _gaussian_blur, batch_generator, cutmix_boxes, strong_augment
from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.engine.recipes.semi import build_training, s4mim_loss
from fastseg.kernels.classwise_recon_loss import normalize_patches_ref
from fastseg.layers.masking import classwise_patch_mask
from fastseg.models.s4mim import S4MIM, per_class_inputs, select_class_slots
from fastseg.models.unimatch import masked_pixel_ce

SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)

K = 5
SMALL = {"aspp_channels": 32, "low_level_channels": 16}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * SEED + seed)


def _blocks_labels(b: int = 2, size: int = 32) -> torch.Tensor:
    """Patch-aligned class blocks (8-pixel patches): quadrants of classes 0..3, one quadrant of image 1 ignored."""
    lab = torch.zeros(b, size, size, dtype=torch.long)
    half = size // 2
    lab[:, :half, half:], lab[:, half:, :half], lab[:, half:, half:] = 1, 2, 3
    lab[1, half:, half:] = 255
    return lab


def _semi_batch(b_l: int = 1, b_u: int = 1, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    mask = torch.randint(0, K, (b_l, size, size), generator=g)
    mask[:, :2] = 255
    return {
        "image": torch.randn(b_l, 3, size, size, generator=g),
        "mask": mask,
        "image_u": torch.randn(b_u, 3, size, size, generator=g),
        "image_u_mix": torch.randn(b_u, 3, size, size, generator=g),
        "aug_seed": torch.arange(b_l, dtype=torch.int64) + 100 * seed,
    }


# ---------------------------------------------------------------------------------------------------------------
# Augmentations
# ---------------------------------------------------------------------------------------------------------------
def test_strong_augment_is_seeded_in_range_and_identity_when_disabled():
    x = torch.randn(4, 3, 16, 16).clamp(-2, 2)
    a = strong_augment(x, MEAN, STD, _gen(1))
    b = strong_augment(x, MEAN, STD, _gen(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, strong_augment(x, MEAN, STD, _gen(2)))
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    rgb = a * s + m
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    clamped = ((x * s + m).clamp(0, 1) - m) / s
    same = strong_augment(x, MEAN, STD, _gen(3), p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    torch.testing.assert_close(same, clamped)
    grey = strong_augment(x, MEAN, STD, _gen(3), p_jitter=0.0, p_gray=1.0, p_blur=0.0) * s + m
    torch.testing.assert_close(grey[:, 0], grey[:, 1])
    torch.testing.assert_close(grey[:, 1], grey[:, 2])


def test_gaussian_blur_matches_a_dense_2d_convolution():
    x = torch.randn(3, 2, 17, 15, dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    out = _gaussian_blur(x, sigma, radius=4)
    for i in range(3):
        t = torch.arange(-4, 5, dtype=torch.float64)
        k1 = torch.exp(-0.5 * (t / sigma[i]) ** 2)
        k1 = k1 / k1.sum()
        k2 = (k1[:, None] * k1[None, :]).expand(2, 1, 9, 9)
        ref = F.conv2d(F.pad(x[i : i + 1], (4, 4, 4, 4), mode="reflect"), k2, groups=2)
        torch.testing.assert_close(out[i : i + 1], ref)


def test_cutmix_boxes_are_rectangles_of_the_requested_area():
    boxes = cutmix_boxes(64, 40, 40, _gen(0), torch.device("cpu"), p=1.0)
    assert not cutmix_boxes(8, 40, 40, _gen(0), torch.device("cpu"), p=0.0).any()
    for box in boxes:
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(box.sum()) == h * w  # a filled axis-aligned rectangle
        assert 1 <= h * w <= 0.4 * 40 * 40 + 1


def test_masked_pixel_ce_against_plain_computation():
    g = _gen(0)
    logits, target = torch.randn(2, K, 6, 7, generator=g), torch.randint(0, K, (2, 6, 7), generator=g)
    keep = torch.rand(2, 6, 7, generator=g) > 0.4
    ref = F.cross_entropy(logits, target, reduction="none")[keep].sum() / target.numel()
    torch.testing.assert_close(masked_pixel_ce(logits, target, keep), ref)


# ---------------------------------------------------------------------------------------------------------------
# UniMatch loss
# ---------------------------------------------------------------------------------------------------------------
def _threshold_in_a_gap(conf: torch.Tensor, min_gap: float = 1e-5) -> float:
    """A confidence threshold in the widest gap between sorted confidences of the middle half (about half kept).

    The model and the plain recomputation compute the same confidences in different batch compositions, so they
    differ by fp32 rounding (~1e-7 on values below 1): a threshold at least ``min_gap / 2`` from every value keeps the
    same pixels in both. ``tau = 0`` would keep every pixel and test no mask at all.
    """
    values = conf.flatten().sort().values
    n = values.numel()
    lo, hi = n // 4, 3 * n // 4
    gaps = values[lo + 1 : hi + 1] - values[lo:hi]
    i = lo + int(gaps.argmax())
    assert float(gaps.max()) > min_gap, f"widest confidence gap near the median is {float(gaps.max()):.1e}"
    return float((values[i] + values[i + 1]) / 2)


# UniMatch's strong views, and the colour-preserving one that `strong_aug` can select instead (issue 18).
GENTLE_AUG = {"jitter": [0.5, 0.5, 0.0, 0.0], "p_gray": 0.0, "blur_sigma": [0.1, 0.4]}


@pytest.mark.parametrize("strong_aug", [None, GENTLE_AUG])
def test_unimatch_loss_equals_a_plain_recomputation(strong_aug):
    model = fastseg.create_model(
        "unimatch_resnet18", num_classes=K, strong_aug=strong_aug, **SMALL
    ).eval()  # eval: no dropout
    batch = _semi_batch(b_l=2, b_u=2)
    u, u_mix, size = batch["image_u"], batch["image_u_mix"], (32, 32)

    def full(images):
        return F.interpolate(model(images), size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():
        conf_mix, lab_mix = full(u_mix).softmax(1).max(1)
        conf_u, lab_u = full(u).softmax(1).max(1)
    # A threshold that drops about half of the pseudo-labels, so that the confidence mask is exercised.
    model.tau = tau = _threshold_in_a_gap(torch.cat([conf_u, conf_mix]))
    out = model.loss(batch)

    g = batch_generator(batch, torch.device("cpu"))
    cfg = model.pretrained_cfg
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in (strong_aug or {}).items()}
    strong = [strong_augment(torch.cat([u, u_mix]), cfg.mean, cfg.std, g, **options) for _ in range(2)]
    boxes = [cutmix_boxes(2, 32, 32, g, torch.device("cpu"), p=0.5) for _ in range(2)]
    with torch.no_grad():
        sup = F.cross_entropy(full(batch["image"]), batch["mask"], ignore_index=255)
        unsup = []
        for view, box in zip(strong, boxes):
            mixed = torch.where(box[:, None], view[2:], view[:2])
            target, conf = torch.where(box, lab_mix, lab_u), torch.where(box, conf_mix, conf_u)
            ce = F.cross_entropy(full(mixed), target, reduction="none")
            unsup.append((ce * (conf >= tau)).sum() / ce.numel())
        ce_fp = F.cross_entropy(full(u), lab_u, reduction="none")
        fp = (ce_fp * (conf_u >= tau)).sum() / ce_fp.numel()
    kept = (conf_u >= tau).float().mean()
    assert 0.1 < kept < 0.9, f"the threshold keeps {kept:.0%} of the pixels: the mask is not exercised"
    torch.testing.assert_close(out["conf_ratio"], kept)
    expected = (sup + 0.25 * unsup[0] + 0.25 * unsup[1] + 0.5 * fp) / 2
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["s1"], unsup[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["s2"], unsup[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["fp"], fp, rtol=1e-4, atol=1e-5)
    # The threshold matters: keeping every pixel gives a different fp term.
    assert not torch.allclose(fp, ce_fp.mean(), rtol=1e-3)


def test_decoder_has_no_dropout_by_default_as_upstream():
    """UniMatch's ASPP projection is conv-BN-ReLU: in train mode the weak view (the pseudo-labels' source) must be a
    deterministic pass; the former ASPP Dropout(0.5) (issue 18) stays available as ``aspp_dropout``."""
    x = torch.randn(2, 3, 32, 32, generator=_gen(7))
    torch.manual_seed(SEED)
    model = fastseg.create_model("unimatch_resnet18", num_classes=K, **SMALL).train()
    with torch.no_grad():
        torch.testing.assert_close(model.run(x)[0], model.run(x)[0])
    torch.manual_seed(SEED)
    noisy = fastseg.create_model("unimatch_resnet18", num_classes=K, aspp_dropout=0.5, **SMALL).train()
    assert noisy.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert not torch.allclose(noisy.run(x)[0], noisy.run(x)[0])
    noisy.eval()
    with torch.no_grad():
        torch.testing.assert_close(noisy.run(x)[0], noisy.run(x)[0])


def test_loss_is_a_function_of_the_batch_seed():
    torch.manual_seed(SEED)
    model = fastseg.create_model("s4mim_resnet18", num_classes=K, tau=0.0, **SMALL).eval()
    batch = _semi_batch()
    first, second = model.loss(batch)["loss"], model.loss(batch)["loss"]
    assert torch.equal(first, second)
    other = dict(batch, aug_seed=batch["aug_seed"] + 1)
    assert not torch.equal(first, model.loss(other)["loss"])


# ---------------------------------------------------------------------------------------------------------------
# Class-wise masking and per-class inputs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_classwise_mask_respects_class_regions_and_ratio(ratio):
    labels = _blocks_labels(b=2, size=32)  # each class region is 2 x 2 = 4 patches of 8 pixels
    masked = classwise_patch_mask(labels, 8, ratio, generator=_gen(1), num_classes=K)
    assert not masked[labels == 255].any()  # ignored regions are never masked
    for b in range(2):
        for k in range(4):
            region = labels[b] == k
            if not region.any():
                continue
            patches = int(masked[b][region].sum()) // 64
            assert abs(patches - ratio * 4) < 1  # stochastic rounding: within one patch of the ratio


def test_per_class_inputs_isolate_each_class():
    g = _gen(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = _blocks_labels()
    masked = classwise_patch_mask(labels, 8, 0.5, generator=_gen(2), num_classes=K)
    inputs, labels_n, src, cls = per_class_inputs(images, labels, masked, K, None, _gen(3))
    expected_pairs = {(b, k) for b in range(2) for k in range(K) if ((labels[b] == k) & masked[b]).any()}
    assert {(int(b), int(k)) for b, k in zip(src, cls)} == expected_pairs
    for n in range(inputs.shape[0]):
        b, k = int(src[n]), int(cls[n])
        keep = (labels[b] == k) & ~masked[b]
        torch.testing.assert_close(inputs[n][:, keep], images[b][:, keep])  # visible pixels of class k kept
        assert (inputs[n][:, ~keep] == 0).all()  # everything else (other classes, masked, ignored) removed
        assert torch.equal(labels_n[n] == k, labels[b] == k) and ((labels_n[n] == k) | (labels_n[n] == 255)).all()
    capped = per_class_inputs(images, labels, masked, K, 1, _gen(3))[2]
    assert torch.equal(torch.bincount(capped, minlength=2), torch.tensor([1, 1]))


def _fair_share_ok(counts: torch.Tensor, available: torch.Tensor) -> bool:
    """Max-min fairness: a class with fewer slots than the most served one (minus one) got all it had."""
    top = int(counts.max())
    return bool(((counts == available) | (counts >= top - 1)).all())


def test_select_class_slots_shares_the_budget_class_balanced():
    g = _gen(11)
    present = torch.rand(8, 12, generator=g) < 0.7
    present[:, 11] = False
    present[3, 11] = True  # a rare class, present in one image only
    available = present.sum(0)
    for budget in (5, 12, 20, 40):
        src, cls = select_class_slots(present, _gen(12), max_inputs=budget)
        assert src.numel() == min(budget, int(present.sum()))
        assert present[src, cls].all() and len(set(zip(src.tolist(), cls.tolist()))) == src.numel()
        counts = torch.bincount(cls, minlength=12)
        if budget >= 12:  # every class present in the batch gets MIM, the rare one included
            assert bool((counts > 0).all())
        else:
            assert int((counts > 0).sum()) == budget  # one slot per class until the classes run out
        assert _fair_share_ok(counts, available), (budget, counts, available)
    # random: another generator picks other images (and other classes when fewer slots than classes)
    picks = {tuple(select_class_slots(present, _gen(s), max_inputs=9)[0].tolist()) for s in range(5)}
    assert len(picks) > 1
    # within the budget every pair gets an input and nothing is drawn
    g = _gen(13)
    state = g.get_state()
    src, cls = select_class_slots(present, g, max_inputs=1000)
    assert torch.equal(torch.stack([src, cls]), torch.stack(present.nonzero(as_tuple=True)))
    assert torch.equal(g.get_state(), state)
    # the old per-image cap, kept as an option, leaves classes out that the budget covers
    src_cap, cls_cap = select_class_slots(present, _gen(12), max_classes_per_image=1)
    assert torch.equal(torch.bincount(src_cap, minlength=8), torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_inputs"):
        select_class_slots(present, max_inputs=-1)


def _many_class_labels(b: int = 2, size: int = 40, classes: int = 10) -> torch.Tensor:
    """Cityscapes-like class maps: ``classes`` vertical stripes per image (each image its own class order)."""
    assert size % classes == 0
    cols = torch.arange(size) // (size // classes)
    return torch.stack([torch.randperm(classes, generator=_gen(20 + i))[cols].expand(size, size) for i in range(b)])


def test_default_budget_covers_every_class_where_the_old_cap_did_not():
    torch.manual_seed(SEED)
    images = torch.randn(2, 3, 40, 40, generator=_gen(5))
    labels = _many_class_labels(classes=10)
    kw = dict(num_classes=12, impl="torch", **SMALL)
    model = fastseg.create_model("s4mim_resnet18", **kw).eval()
    with torch.no_grad():
        terms = model.mim_terms(images, labels, model(images), _gen(7))
    # 20 (image, class) pairs, a budget of 4 per image = 8 inputs (class-balanced: `select_class_slots`)
    assert model.budget(2) == 8 and int(terms["mim_inputs"]) == 8
    capped = fastseg.create_model("s4mim_resnet18", max_classes_per_image=3, mim_budget=None, **kw).eval()
    with torch.no_grad():
        assert int(capped.mim_terms(images, labels, capped(images), _gen(7))["mim_inputs"]) == 6
    unbounded = fastseg.create_model("s4mim_resnet18", mim_budget=None, **kw).eval()
    with torch.no_grad():
        assert int(unbounded.mim_terms(images, labels, unbounded(images), _gen(7))["mim_inputs"]) == 20


# ---------------------------------------------------------------------------------------------------------------
# S4MIM losses against plain PyTorch
# ---------------------------------------------------------------------------------------------------------------
def _plain_recon(pred, target, labels, masked, num_classes):
    errs = []
    for b in range(pred.shape[0]):
        for k in range(num_classes):
            sel = (labels[b] == k) & masked[b]
            if sel.any():
                errs.append((pred[b][:, sel] - target[b][:, sel]).square().mean())
    return torch.stack(errs).mean()


def _plain_agg(feats, labels, masked, num_classes):
    labels = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
    masked = F.interpolate(masked[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].bool()
    dists = []
    for b in range(feats.shape[0]):
        for k in range(num_classes):
            m, v = (labels[b] == k) & masked[b], (labels[b] == k) & ~masked[b]
            if m.any() and v.any():
                mu_m, mu_v = feats[b][:, m].mean(1), feats[b][:, v].mean(1)
                dists.append(1 - F.cosine_similarity(mu_m, mu_v, dim=0, eps=1e-8))
    return torch.stack(dists).mean()


@pytest.mark.parametrize(
    "mim,mim_input,normalize",
    [
        ("classwise", "per_class", False),
        ("classwise", "single", True),
        ("plain", "single", False),
        ("plain", "per_class", False),
    ],
)
def test_mim_terms_equal_plain_computation(mim, mim_input, normalize):
    torch.manual_seed(SEED)
    model = fastseg.create_model(
        "s4mim_resnet18", num_classes=K, mim=mim, mim_input=mim_input, normalize_target=normalize, impl="torch", **SMALL
    ).eval()
    images = torch.randn(2, 3, 32, 32, generator=_gen(5))
    labels = _blocks_labels()
    labels[0, :3, :5] = 4  # a small extra region inside one patch
    with torch.no_grad():  # a trained-looking mask indicator (it starts at zero), so that its input matters
        model.mask_indicator.weight.normal_(generator=_gen(9))
    terms = model.mim_terms(images, labels, model(images), _gen(7))

    # The documented procedure, recomputed (issue 18: both variants share the slots and the loss definitions).
    g = _gen(7)
    slots = [(b, k) for b in range(2) for k in range(K) if (labels[b] == k).any()]
    assert len(slots) <= model.budget(2)  # every slot fits the default budget: no draw for the selection
    src, cls = torch.tensor([b for b, _ in slots]), torch.tensor([k for _, k in slots])
    if mim == "plain":
        masked = classwise_patch_mask(torch.zeros_like(labels), 8, 0.5, generator=g, num_classes=1)
    else:
        masked = classwise_patch_mask(labels, 8, 0.5, generator=g, num_classes=K)
    if mim_input == "per_class":
        region = labels[src] == cls.view(-1, 1, 1)
        labels_n, targets = torch.where(region, labels[src], 255), images[src]
        if mim == "plain":  # an independent image-level mask per input, the rest of the image visible
            masked_n = classwise_patch_mask(torch.zeros_like(labels_n), 8, 0.5, generator=g, num_classes=1)
            visible = ~masked_n
        else:  # only the class's own pixels are hidden, only its visible pixels kept
            masked_n = masked[src] & region
            visible = region & ~masked_n
        inputs = torch.where(visible[:, None], targets, 0.0)
    else:
        inputs, labels_n, masked_n, targets = torch.where(masked[:, None], 0.0, images), labels, masked, images
    with torch.no_grad():
        logits, feats = model.run_mim(inputs, masked_n)  # the indicator marks exactly the hidden pixels
        pred = model.recon_head(feats)
    if normalize:
        targets = normalize_patches_ref(targets, 8)
    # the reconstruction covers the labelled masked pixels per (input, class), for plain MIM too (was: one group per
    # image over every masked pixel, issue 18)
    torch.testing.assert_close(terms["rec"], _plain_recon(pred, targets, labels_n, masked_n, K), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["agg"], _plain_agg(feats, labels_n, masked_n, K), rtol=1e-4, atol=1e-6)
    up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    sel = masked_n & (labels_n != 255)
    ce = F.cross_entropy(up.permute(0, 2, 3, 1)[sel], labels_n[sel])
    torch.testing.assert_close(terms["sem"], ce, rtol=1e-4, atol=1e-6)
    assert int(terms["mim_inputs"]) == inputs.shape[0]


@pytest.mark.parametrize("mim_input", ["per_class", "single"])
def test_plain_and_classwise_mim_differ_only_in_mask_and_context(mim_input):
    """Same slots, inputs budget, targets and loss pixel sets (by class); only the mask and the context differ."""
    kw = dict(num_classes=12, impl="torch", mim_input=mim_input, **SMALL)
    images = torch.randn(2, 3, 40, 40, generator=_gen(5))
    labels = _many_class_labels(classes=10)  # 20 slots for a budget of 8: the class-balanced draw binds
    labels[1, :, :6] = 255
    batches = {}
    for mim in ("classwise", "plain"):
        model = fastseg.create_model("s4mim_resnet18", mim=mim, **kw)
        batches[mim] = model.mim_batch(images, labels, _gen(7))
    cw, pl = batches["classwise"], batches["plain"]
    expected_n = 8 if mim_input == "per_class" else 2
    for key in ("source", "targets", "labels"):
        assert torch.equal(cw[key], pl[key]), key
    assert cw["inputs"].shape == pl["inputs"].shape and cw["inputs"].shape[0] == expected_n
    lab = cw["labels"]
    for n in range(expected_n):
        own = lab[n] != 255
        # class-wise: hides only pixels of the input's class (single: of labelled classes) ...
        assert not (cw["masked"][n] & ~own).any()
        if mim_input == "per_class":  # ... and keeps no pixel of another class
            assert (cw["inputs"][n][:, ~own] == 0).all()
        else:  # ... and (single input, the cheap variant) keeps every visible pixel as plain does
            visible = ~cw["masked"][n]
            torch.testing.assert_close(cw["inputs"][n][:, visible], cw["targets"][n][:, visible])
        # plain: hides whole patches anywhere (other classes and ignored pixels too) and keeps every visible pixel
        blocks = pl["masked"][n].view(5, 8, 5, 8)
        assert torch.equal(blocks.all(3).all(1), blocks.any(3).any(1))
        visible = ~pl["masked"][n]
        torch.testing.assert_close(pl["inputs"][n][:, visible], cw["targets"][n][:, visible])
    assert (pl["masked"] & (lab == 255)).any()  # plain masks beyond the input's class
    if mim_input == "per_class":  # the same mask ratio on each side: about half of the loss pixels are hidden
        for mb in (cw, pl):
            share = (mb["masked"] & (lab != 255)).sum() / (lab != 255).sum()
            assert 0.3 < float(share) < 0.7, float(share)


def test_mask_indicator_is_a_zero_initialised_fourth_input_channel():
    from fastseg.models.backbones import create_backbone

    torch.manual_seed(SEED)
    model = fastseg.create_model("s4mim_resnet18", num_classes=K, impl="torch", **SMALL).eval()
    images = torch.randn(2, 3, 32, 32, generator=_gen(5))
    masked = torch.rand(2, 32, 32, generator=_gen(6)) < 0.3
    with torch.no_grad():
        before = model(images)
        for a, b in zip(model.run_mim(images, masked), model.run(images)):  # zero-initialised: no effect yet
            torch.testing.assert_close(a, b)
        model.mask_indicator.weight.normal_(generator=_gen(9))
        logits, feats = model.run_mim(images, masked)
        # independent reference: the same encoder with a 4-channel first convolution on [image; mask]
        body = create_backbone("resnet18", output_stride=16).body.eval()
        body.load_state_dict(model.backbone.body.state_dict())
        conv1 = torch.nn.Conv2d(4, 64, 7, 2, 3, bias=False)
        conv1.weight.copy_(torch.cat([model.backbone.body.conv1.weight, model.mask_indicator.weight], 1))
        body.conv1 = conv1
        stages = body(torch.cat([images, masked[:, None].float()], 1))
        ref_logits, ref_feats = model.decode(stages[0], stages[-1])
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(logits, model.run(images)[0], atol=1e-3)  # the signal reaches the output
        # outside the MIM branch the indicator is never applied (inference, supervised and UniMatch passes)
        torch.testing.assert_close(model(images), before)
    # it is learned: the MIM loss reaches it
    train = fastseg.create_model("s4mim_resnet18", num_classes=K, tau=0.0, **SMALL)
    train.loss(_semi_batch())["loss"].backward()
    assert train.mask_indicator.weight.grad is not None and train.mask_indicator.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("signal", ["indicator", "token", "none"])
def test_masked_pixels_differ_from_other_class_fill(signal):
    """A per-class input's masked pixels and other classes' removed pixels: told apart unless mask_signal="none"."""
    model = fastseg.create_model("s4mim_resnet18", num_classes=K, impl="torch", mask_signal=signal, **SMALL)
    if signal == "token":
        with torch.no_grad():
            model.mask_token.copy_(torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1))
    images = torch.randn(2, 3, 32, 32, generator=_gen(5))
    mb = model.mim_batch(images, _blocks_labels(), _gen(7))
    inputs, hidden, own = mb["inputs"], mb["masked"], mb["labels"] != 255
    other = ~own  # other classes' (and ignored) pixels, removed from the input
    assert hidden.any() and other.any()
    assert (inputs.permute(0, 2, 3, 1)[other] == 0).all()  # other-class fill: 0
    if signal == "token":
        assert torch.equal(inputs.permute(0, 2, 3, 1)[hidden], model.mask_token.view(1, 3).expand(int(hidden.sum()), 3))
    else:  # the same value as the other-class fill: only the indicator (if any) tells them apart
        assert (inputs.permute(0, 2, 3, 1)[hidden] == 0).all()
        assert hasattr(model, "mask_indicator") == (signal == "indicator")


@pytest.mark.parametrize("mim", ["classwise", "plain"])
def test_mim_inputs_can_be_kept_out_of_the_batchnorm_running_averages(mim):
    def running(model):
        return [b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]

    batch = _semi_batch(b_l=2, b_u=2)
    torch.manual_seed(SEED)
    held = fastseg.create_model("s4mim_resnet18", num_classes=K, tau=0.0, mim=mim, mim_updates_bn=False, **SMALL)
    updated, base = copy.deepcopy(held), copy.deepcopy(held)
    updated.mim_updates_bn = True
    for model in (held, updated, base):
        model.train()
    torch.manual_seed(SEED)
    out = held.loss(batch)
    assert float(out["mim_inputs"]) > 0 and torch.isfinite(out["loss"])
    torch.manual_seed(SEED)
    updated.loss(batch)
    torch.manual_seed(SEED)
    base.unimatch_terms(batch, batch_generator(batch, torch.device("cpu")))  # UniMatch's forwards alone
    # Held: the running averages are what UniMatch's forwards left; the default moves them further.
    for mine, theirs in zip(running(held), running(base)):
        torch.testing.assert_close(mine, theirs)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(running(updated), running(base)))
    assert all(m.momentum == 0.1 for m in held.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_plain_mim_runs_as_many_encoder_inputs_as_classwise():
    outs = {}
    for mim in ("classwise", "plain"):
        torch.manual_seed(SEED)
        model = fastseg.create_model("s4mim_resnet18", num_classes=K, mim=mim, tau=0.0, **SMALL).eval()
        outs[mim] = model.loss(_semi_batch(b_l=2, b_u=2))
    assert int(outs["plain"]["mim_inputs"]) == int(outs["classwise"]["mim_inputs"]) > 4  # was 4 vs up to 12


def test_label_space_reconstruction_variant_trains_its_decoder(gradient_check):
    torch.manual_seed(SEED)
    model = fastseg.create_model("s4mim_resnet18", num_classes=K, semantic_mim="reconstruct", tau=0.0, **SMALL)
    out = model.loss(_semi_batch())
    assert torch.isfinite(out["loss"]) and out["sem"] > 0
    out["loss"].backward()
    assert not gradient_check.silent(model.label_decoder)
    grad = model.backbone.body.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the loss reaches the encoder's first layer


# ---------------------------------------------------------------------------------------------------------------
# Fused kernels vs torch reference in a full training step
# ---------------------------------------------------------------------------------------------------------------
def test_training_step_triton_equals_torch(count_fastseg_ops, triton_device):
    kw = dict(num_classes=K, tau=0.0, **SMALL)
    fused = fastseg.create_model("s4mim_resnet18", impl="triton", deterministic=True, **kw).to(triton_device)
    plain = fastseg.create_model("s4mim_resnet18", impl="torch", **kw).to(triton_device)
    plain.load_state_dict(fused.state_dict())
    batch = {k: v.to(triton_device) for k, v in _semi_batch(b_l=1, b_u=1, size=32).items()}
    results, calls = [], []
    for model in (fused, plain):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)  # the same dropout draws in both
        with count_fastseg_ops() as counted:
            out = model.loss(batch)
            opt.zero_grad()
            out["loss"].backward()
        calls.append(counted)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        results.append((out, grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (o1, g1, p1), (o2, g2, p2) = results
    # impl="triton" really launched the fused kernels, forward and backward (through the interpreter on CPU), and
    # nothing of the class-wise family fell back to its reference; impl="torch" called none of the ops.
    fused_ops = ("classwise_masked_recon_loss", "classwise_reduce")
    assert all(calls[0].triton[op] >= 1 and calls[0].triton[op + "_backward"] >= 1 for op in fused_ops), calls[0]
    assert not any(op.startswith("classwise") for op in calls[0].reference), calls[0].reference
    assert not calls[1].triton and not calls[1].reference, calls[1]
    for key in ("loss", "rec", "agg", "sem"):
        torch.testing.assert_close(o1[key], o2[key], rtol=1e-4, atol=1e-6)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-3, atol=1e-5, msg=name)
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Data: pairs, and unlabelled masks never reach the loss
# ---------------------------------------------------------------------------------------------------------------
def _corrupt(sample):
    sample = dict(sample)
    sample["mask"] = torch.full_like(sample["mask"], 7)
    return sample


def test_unlabelled_masks_never_reach_the_loss():
    world = ShapesConfig(image_size=32)
    lab = ShapesDataset("train", length=64, config=world, subset="labelled", labelled_fraction=0.25)
    unl = ShapesDataset("train", length=64, config=world, subset="unlabelled", labelled_fraction=0.25)
    bad = ShapesDataset(
        "train", length=64, config=world, subset="unlabelled", labelled_fraction=0.25, transform=_corrupt
    )
    clean, corrupted = SemiSupervisedPairs(lab, unl, length=100), SemiSupervisedPairs(lab, bad, length=100)
    items = [clean[i] for i in range(2)]
    assert set(items[0]) == {"image", "mask", "image_u", "image_u_mix", "aug_seed"}
    assert all(bool(lab[clean.indices(i)[0]]["labelled"]) for i in range(20))
    torch.manual_seed(SEED)
    model = fastseg.create_model("s4mim_resnet18", num_classes=world.num_classes, tau=0.0, **SMALL).eval()
    a = s4mim_loss(model, default_collate(items))
    b = s4mim_loss(model, default_collate([corrupted[i] for i in range(2)]))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pairs_are_deterministic_and_validate():
    world = ShapesConfig(image_size=32)
    lab = ShapesDataset("train", length=32, config=world, subset="labelled", labelled_fraction=0.25)
    unl = ShapesDataset("train", length=32, config=world, subset="unlabelled", labelled_fraction=0.25)
    pairs = SemiSupervisedPairs(lab, unl, length=50, seed=3)
    assert pairs.indices(7) == pairs.indices(7) and pairs.indices(7)[1] != pairs.indices(7)[2]
    assert torch.equal(pairs[7]["image_u"], SemiSupervisedPairs(lab, unl, length=50, seed=3)[7]["image_u"])
    with pytest.raises(IndexError):
        pairs[50]
    with pytest.raises(ValueError, match="labelled=False"):
        SemiSupervisedPairs(unl, unl)[0]


def test_build_training_recipes():
    model, pairs, loss_fn = build_training(
        "s4mim_resnet18", world=ShapesConfig(image_size=32), labelled_fraction=0.125, train_length=64, **SMALL
    )
    assert isinstance(model, S4MIM) and isinstance(pairs, SemiSupervisedPairs) and loss_fn is s4mim_loss
    assert len(pairs.labelled) == 8 and len(pairs.unlabelled) == 56
    _, labelled, fn = build_training(
        "unimatch_resnet18", labelled_fraction=0.125, train_length=64, semi_supervised=False, **SMALL
    )
    assert fn is None and len(labelled) == 8 and labelled.subset == "labelled"
    with pytest.raises(ValueError, match="labelled_fraction"):
        build_training("s4mim_resnet18", labelled_fraction=1.0, **SMALL)
    with pytest.raises(ValueError, match="labelled_fraction"):
        build_training("s4mim_resnet18", labelled_fraction=0.0, **SMALL)


def test_engine_trains_on_pairs():
    from fastseg.engine import TrainConfig, train

    world = ShapesConfig(image_size=32)
    torch.manual_seed(SEED)
    model, pairs, loss_fn = build_training(
        "s4mim_resnet18", world=world, labelled_fraction=0.25, train_length=32, pairs_length=16, tau=0.0, **SMALL
    )
    cfg = TrainConfig(steps=2, batch_size=2, out_dir=None, progress=False, device="cpu", log_every=1)
    result = train(model, pairs, cfg, loss_fn=loss_fn)
    assert len(result.history) == 2 and all("rec" in r and "s1" in r for r in result.history)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mim": "random"}, "mim"),
        ({"semantic_mim": "x"}, "semantic_mim"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"patch_size": 0}, "patch_size"),
        ({"impl": "cuda"}, "impl"),
        ({"weights": (1.0, -1.0, 0.0)}, "weights"),
        ({"tau": 1.5}, "tau"),
        ({"mask_ownership": "patch"}, "mask_ownership"),
        ({"mim_budget": 0.0}, "mim_budget"),
        ({"mask_signal": "noise"}, "mask_signal"),
        ({"aspp_dropout": 1.0}, "dropout"),
        ({"strong_aug": {"hue": 0.1}}, "unknown strong augmentation"),
        ({"strong_aug": {"p_gray": 1.5}}, "p_gray"),
        ({"strong_aug": {"jitter": (0.5, 0.5, 0.5)}}, "jitter"),
        ({"strong_aug": {"blur_sigma": (2.0, 0.1)}}, "blur_sigma"),
        ({"strong_aug": {"blur_radius": 0}}, "blur_radius"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastseg.create_model("s4mim_resnet18", num_classes=K, **SMALL, **kwargs)


def test_bad_unlabelled_batch_is_a_clear_error():
    model = fastseg.create_model("s4mim_resnet18", num_classes=K, **SMALL)
    batch = _semi_batch()
    batch["image_u_mix"] = batch["image_u_mix"][..., :16]
    with pytest.raises(ValueError, match="image_u_mix"):
        model.loss(batch)
