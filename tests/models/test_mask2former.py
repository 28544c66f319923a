"""Mask2Former: the fused masked-attention op on the decoder's hot path, post-processing rules on hand-made
predictions, matcher optimality, targets, bad inputs and the interface PADing builds on. (The generic model
contract -- forward / backward, odd sizes, a few steps lowering the loss -- is in test_model_contract.py.)"""

from __future__ import annotations

import itertools

import pytest
import torch

import fastseg
from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.models.mask2former import VOID, Mask2Former
from fastseg.models.mask2former_criterion import (
    HungarianMatcher,
    SegmentTargets,
    targets_from_batch,
)

TINY = {
    "num_queries": 6,
    "hidden_dim": 32,
    "mask_dim": 32,
    "num_heads": 2,
    "ffn_dim": 64,
    "dec_layers": 3,
    "enc_layers": 1,
    "enc_heads": 2,
    "enc_ffn_dim": 64,
    "train_num_points": 256,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastseg.create_model("mask2former_resnet18", **TINY).eval()


@pytest.fixture(scope="module")
def batch():
    ds = ShapesDataset("train", length=2, config=ShapesConfig(image_size=64))
    return torch.utils.data.default_collate([ds[0], ds[1]])


def test_fused_masked_attention_op_runs_once_per_decoder_layer(model, batch, count_fastseg_ops):
    op = "masked_class_attention"
    with count_fastseg_ops() as calls:
        model(torch.randn(1, 3, 64, 64))
    assert calls.triton[op] + calls.reference[op] == TINY["dec_layers"]
    model.train()
    try:
        with count_fastseg_ops() as calls:
            model.loss(batch)["loss"].backward()
    finally:
        model.eval()
    assert calls.triton[op] + calls.reference[op] == TINY["dec_layers"]
    assert calls.triton[f"{op}_backward"] + calls.reference[f"{op}_backward"] == TINY["dec_layers"]
    # negative control: the plain reference (impl="torch") does not go through the op
    model.set_impl("torch")
    try:
        with count_fastseg_ops() as calls:
            model(torch.randn(1, 3, 64, 64))
        assert calls.triton[op] + calls.reference[op] == 0
    finally:
        model.set_impl("auto")


def test_triton_decoder_equals_torch(count_fastseg_ops, triton_device):
    # The decoder's masked attention through the Triton kernel (GPU, or the interpreter on the CPU) gives the
    # reference's logits and gradients, and the calls really take the Triton path.
    torch.manual_seed(0)
    m = fastseg.create_model("mask2former_resnet18", **TINY).to(triton_device).train()
    x = torch.randn(1, 3, 64, 64, device=triton_device)
    out, grads = {}, {}
    for impl in ("torch", "triton"):
        m.set_impl(impl)
        m.zero_grad()
        with count_fastseg_ops() as calls:
            cls, masks = m.forward_raw(x)
            (cls.square().mean() + masks.sigmoid().mean()).backward()
        out[impl] = (cls.detach(), masks.detach())
        grads[impl] = m.predictor.query_feat.weight.grad.clone()
        if impl == "triton":
            assert calls.triton["masked_class_attention"] == TINY["dec_layers"]
            assert calls.triton["masked_class_attention_backward"] == TINY["dec_layers"]
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads["torch"], grads["triton"], rtol=1e-3, atol=1e-5)


def test_semantic_output_is_the_mask_class_product(model):
    x = torch.randn(2, 3, 64, 64)
    cls, masks = model.forward_raw(x)
    assert cls.shape == (2, TINY["num_queries"], model.num_classes + 1) and masks.shape == (
        2,
        TINY["num_queries"],
        16,
        16,
    )
    expected = torch.einsum("bqk,bqhw->bkhw", cls.softmax(-1)[..., :-1], masks.sigmoid())
    torch.testing.assert_close(model(x), expected)
    assert model.predict(x).shape == (2, 64, 64)


def _fixed(model: Mask2Former, class_logits: torch.Tensor, mask_logits: torch.Tensor):
    """The model with its raw predictions replaced, so post-processing is tested on hand-made inputs."""
    m = Mask2Former.__new__(Mask2Former)
    m.__dict__.update(model.__dict__)
    m._full_size_masks = lambda images: (class_logits[None], mask_logits[None])
    return m


def _logits(probs_rows, k):
    """Class logits whose softmax is (close to) the given rows; the rest of the mass goes to no-object (k)."""
    out = torch.full((len(probs_rows), k + 1), -30.0)
    for q, row in enumerate(probs_rows):
        row = dict(row)
        if k not in row and sum(row.values()) < 1:
            row[k] = 1 - sum(row.values())
        for c, p in row.items():
            out[q, c] = torch.log(torch.tensor(p))
    return out


def test_panoptic_post_processing_rules(model):
    k = model.num_classes  # 12: stuff 0..3, things 4..11
    big = 20.0
    masks = torch.full((5, 4, 8), -big)
    masks[0, :, :4] = big  # q0: stuff 1 (sky) on the left half but the top-left 2x2
    masks[0, :2, :2] = -big
    masks[1, :, 4:] = big  # q1: stuff 1 again, right half but (3, 7) -> merged with q0 (same id)
    masks[1, 3, 7] = -big
    masks[2, :2, :2] = big  # q2: thing 5, score 0.95
    masks[3, :2, :2] = big  # q3: thing 6 on the same pixels with a lower score, plus (3, 7), which it wins:
    masks[3, 3, 7] = big  # 1 of its 5 pixels < overlap threshold 0.8 -> dropped, (3, 7) stays void
    masks[4, 2:, :] = big  # q4: thing 7 with score 0.5 < object threshold 0.8 -> not kept
    cls = _logits([{1: 0.99}, {1: 0.9}, {5: 0.95}, {6: 0.85}, {7: 0.5}], k)
    pan = _fixed(model, cls, masks).predict(torch.zeros(1, 3, 4, 8), task="panoptic")[0]
    assert pan.shape == (4, 8)
    assert (pan[:2, :2] == 5 * 1000 + 1).all()  # the thing keeps its pixels, numbered 1
    assert pan[3, 7] == VOID
    rest = torch.ones(4, 8, dtype=torch.bool)
    rest[:2, :2] = False
    rest[3, 7] = False
    assert (pan[rest] == 1000).all()  # both stuff queries merged into the one id 1 * 1000
    assert not ((pan // 1000) == 6).any() and not ((pan // 1000) == 7).any()
    # nothing kept -> everything void
    nothing = _logits([{k: 0.99}] * 5, k)
    assert (_fixed(model, nothing, masks).predict(torch.zeros(1, 3, 4, 8), task="panoptic") == VOID).all()


def test_instance_post_processing(model):
    k = model.num_classes
    masks = torch.full((2, 4, 4), -5.0)
    masks[0, :2] = 5.0
    masks[1, 2:] = 1.0
    cls = _logits([{5: 0.9, 1: 0.09}, {6: 0.6}], k)
    m = _fixed(model, cls, masks)
    m.test_topk = 3
    out = m.predict(torch.zeros(1, 3, 4, 4), task="instance")[0]
    # top-3 of the 2 x 12 probabilities are (q0, 5), (q1, 6), (q0, 1); class 1 is stuff -> removed
    assert out["labels"].tolist() == [5, 6]
    assert torch.equal(out["masks"][0], masks[0] > 0) and torch.equal(out["masks"][1], masks[1] > 0)
    mask_score = torch.sigmoid(torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.6]) * mask_score, atol=1e-4, rtol=1e-4)


def test_matcher_finds_the_optimal_assignment():
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(num_points=64)
    q, k, m = 5, 4, 3
    logits = torch.randn(1, q, k + 1, generator=g)
    pred_masks = torch.randn(1, q, 8, 8, generator=g) * 3
    tgt = SegmentTargets(
        torch.tensor([0, 2, 3]), torch.rand(m, 8, 8, generator=g) > 0.5, torch.ones(8, 8, dtype=torch.bool)
    )
    # full-coverage point sets make the cost deterministic: use every pixel centre as a point
    rows, cols = matcher(logits, pred_masks, [tgt], generator=torch.Generator().manual_seed(1))[0]
    assert sorted(cols.tolist()) == [0, 1, 2] and len(set(rows.tolist())) == 3
    # recompute the cost matrix with the same points and check no permutation is cheaper
    gen = torch.Generator().manual_seed(1)
    coords = torch.rand(1, 64, 2, generator=gen)
    from fastseg.models.mask2former_criterion import point_sample

    p = point_sample(pred_masks[0][:, None], coords.expand(q, -1, -1))[:, 0]
    t = point_sample(tgt.masks[:, None].float(), coords.expand(m, -1, -1))[:, 0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    cost = torch.zeros(q, m)
    for i in range(q):
        for j in range(m):
            dice = 1 - (2 * (p[i].sigmoid() * t[j]).sum() + 1) / (p[i].sigmoid().sum() + t[j].sum() + 1)
            cost[i, j] = 5 * bce(p[i], t[j]) - 2 * logits[0, i].softmax(-1)[tgt.labels[j]] + 5 * dice
    chosen = float(cost[rows, cols].sum())
    best = min(float(sum(cost[perm[j], j] for j in range(m))) for perm in itertools.permutations(range(q), m))
    assert chosen == pytest.approx(best, abs=1e-4)


def test_panoptic_targets_from_a_shapes_batch(batch):
    cfg = ShapesConfig()
    targets = targets_from_batch(batch, cfg.num_classes, 255, cfg.stuff_ids)
    for b, t in enumerate(targets):
        inst = batch["instances"][b]
        valid_instances = torch.unique(inst[(inst > 0) & (batch["mask"][b] != 255)]).numel()
        stuff_present = [c for c in cfg.stuff_ids if ((batch["mask"][b] == c) & (inst == 0)).any()]
        assert t.labels.numel() == valid_instances + len(stuff_present)
        assert not (t.masks & ~t.valid).any()  # ignore pixels belong to no segment
        assert (t.masks.sum(0) <= 1).all()  # segments do not overlap
    semantic = targets_from_batch({"mask": batch["mask"]}, cfg.num_classes, 255, cfg.stuff_ids)
    assert semantic[0].labels.tolist() == sorted(torch.unique(batch["mask"][0][batch["mask"][0] != 255]).tolist())


def test_bad_inputs(model, batch):
    model.train()
    try:
        crowded = dict(batch)
        inst = batch["instances"].clone()
        mask = batch["mask"].clone()
        classes = torch.full((2, 8), 4)
        for i in range(8):  # 8 instances in stripes: more segments than the 6 queries
            inst[0, :, i * 8 : i * 8 + 8] = i + 1
            mask[0, :, i * 8 : i * 8 + 8] = 4
        crowded.update(instances=inst, instance_classes=classes, mask=mask)
        with pytest.raises(ValueError, match="image 0 has 8 ground-truth segments but the model has only 6 queries"):
            model.loss(crowded)
        bad = dict(batch)
        bad["instance_classes"] = torch.full_like(batch["instance_classes"], -1)
        with pytest.raises(ValueError, match="image 0: instance id 1 has no class"):
            model.loss(bad)
        # an all-ignore batch has no segments: the loss is the no-object cross-entropy, finite, with gradients
        empty = {"image": batch["image"], "mask": torch.full_like(batch["mask"], 255)}
        loss = model.loss(empty)
        assert torch.isfinite(loss["loss"]) and float(loss["loss_mask"]) == 0.0
        loss["loss"].backward()
    finally:
        model.eval()
    with pytest.raises(ValueError, match="task must be"):
        model.predict(torch.randn(1, 3, 64, 64), task="depth")


def test_pading_interface(model):
    out = model.forward_queries(torch.randn(1, 3, 64, 64))
    assert len(out["query_embeddings"]) == TINY["dec_layers"] + 1 == len(out["aux_outputs"]) + 1
    assert out["query_embeddings"][-1].shape == (1, TINY["num_queries"], TINY["hidden_dim"])
    assert out["mask_embeddings"][-1].shape == (1, TINY["num_queries"], TINY["mask_dim"])
    torch.testing.assert_close(model.class_head(out["query_embeddings"][-1]), out["pred_logits"])
    m = fastseg.create_model("mask2former_resnet18", **TINY)
    trainable = m.freeze_segmenter()
    assert {id(p) for p in trainable} == {id(p) for p in m.parameters() if p.requires_grad}
    assert all(not p.requires_grad for p in m.backbone.parameters())
    m.replace_class_head(torch.nn.Linear(TINY["hidden_dim"], 15 + 1), num_classes=15)
    assert m.num_classes == 15 and m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 15, 16, 16)


def test_fpn_pixel_decoder_option_trains(batch):
    torch.manual_seed(0)
    m = fastseg.create_model("mask2former_resnet18", pixel_decoder="fpn", **TINY)
    loss = m.loss(batch)
    loss["loss"].backward()
    assert torch.isfinite(loss["loss"])
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_level_embeddings_get_gradient_once_the_offsets_move(batch):
    # At initialisation the sampling-offset / attention-weight projections are zero (Deformable DETR's init), so
    # the encoder's level embeddings get an exactly zero gradient; after one optimizer step they must get one.
    torch.manual_seed(0)
    m = fastseg.create_model("mask2former_resnet18", **TINY).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.loss(batch)["loss"].backward()
    assert not m.pixel_decoder.level_embed.grad.any()
    opt.step()
    opt.zero_grad()
    m.loss(batch)["loss"].backward()
    assert m.pixel_decoder.level_embed.grad.abs().sum() > 0
