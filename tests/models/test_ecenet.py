"""ECENet specifics: the pooled-mask embedding as a matrix, the diagonal fusion, the losses against hand
computations, Triton (interpreter) vs reference logits, the ablation switch and the official-checkpoint converter.

The generic contract (forward / backward / odd sizes / predict / bad inputs) runs over every registered ECENet in
tests/models/test_model_contract.py.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.models.ecenet import (
    ECENet,
    PooledMaskEmbedding,
    convert_official_state_dict,
    diversity_loss,
    mask_loss,
    pool_length,
    pool_sizes,
    pooling_matrix,
)

SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)

K = 5


def _tiny(**kwargs) -> ECENet:
    """A small head on ResNet-18 (C=32, 2 heads) so that interpreter runs stay fast."""
    kwargs.setdefault("channels", 32)
    kwargs.setdefault("num_heads", 2)
    kwargs.setdefault("mlp_ratio", 2)
    return ECENet("resnet18", num_classes=K, **kwargs)


def _batch(b: int = 2, h: int = 64, w: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 3)
    mask = torch.randint(0, K, (b, h, w), generator=g)
    mask[:, :3] = 255
    return {"image": torch.randn(b, 3, h, w, generator=g), "mask": mask}


# --------------------------------------------------------------------------------------- pooled-mask embedding
@pytest.mark.parametrize("k, expected", [(150, 13), (59, 7), (60, 7), (12, 3), (5, 3), (1, 1), (171, 13)])
def test_pool_length_follows_the_official_rule(k, expected):
    assert pool_length(k) == expected
    assert pool_sizes(k) == (1, 2, 3, 6, expected)


def test_linear_input_width_is_l_squared_plus_50():
    emb = PooledMaskEmbedding(150, 16)
    assert emb.cls_learner.in_features == 13 * 13 + 50 == 219


@pytest.mark.parametrize("size", [(16, 16), (20, 20), (21, 21), (21, 13), (5, 7), (1, 1)])
def test_pooling_matrix_equals_adaptive_pooling(size):
    sizes = pool_sizes(150)  # 16 -> 13, 20 -> 6, 21 -> 13: bins that overlap and do not divide
    x = torch.randn(2, 7, *size, dtype=torch.float64)
    ref = torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in sizes], -1)
    mat = pooling_matrix(*size, sizes, dtype=torch.float64)
    assert mat.shape == (sum(s * s for s in sizes), size[0] * size[1])
    torch.testing.assert_close(x.flatten(2) @ mat.t(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(16, 16), (21, 13)])
def test_embedding_matrix_mode_equals_pool_mode(size):
    emb = PooledMaskEmbedding(150, 24, mode="matrix")
    ref = PooledMaskEmbedding(150, 24, mode="pool")
    ref.load_state_dict(emb.state_dict())
    masks = torch.randn(2, 150, *size)
    torch.testing.assert_close(emb(masks), ref(masks), rtol=1e-5, atol=1e-5)


def test_embedding_mode_is_checked():
    with pytest.raises(ValueError, match="mode"):
        PooledMaskEmbedding(5, 8, mode="adaptive")


# --------------------------------------------------------------------------------------- final fusion
def test_logits_are_classifier_plus_the_official_einsum_fusion():
    # ECENet's final fusion, written as the official code writes it (einsum over the class-score matrix), checked
    # against the logits fastseg computes (a diagonal): conv_seg(F) + einsum("bkk,bkhw->bkhw", P, sigmoid(sum M)).
    model = _tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    captured = {}
    model.conv_seg.register_forward_hook(lambda mod, inp, out: captured.setdefault("cls", out))
    model.trans.register_forward_hook(lambda mod, inp, out: captured.setdefault("scores", out))
    with torch.no_grad():
        out = model.forward_head(x)
    assert len(out["masks"]) == 4 and all(m.shape == (1, K, 16, 16) for m in out["masks"])
    scores = torch.softmax(captured["scores"], -1)
    assert not torch.allclose(scores, scores.transpose(1, 2))  # an asymmetric P: a transposed read would show
    official = torch.einsum("bkk,bkhw->bkhw", scores, torch.stack(out["masks"]).sum(0).sigmoid())
    torch.testing.assert_close(out["logits"], captured["cls"] + official)
    assert (official.abs() > 1e-3).float().mean() > 0.5  # the fusion term is not negligible next to the classifier


# --------------------------------------------------------------------------------------- losses by hand
def test_mask_loss_matches_a_hand_computation():
    # one image, two classes, three pixels (the third ignored)
    logits = torch.tensor([[[[2.0, -1.0, 5.0]], [[0.5, 3.0, -5.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))
    bce_terms = [-math.log(sig(2.0)), -math.log(1 - sig(-1.0)), -math.log(1 - sig(0.5)), -math.log(sig(3.0))]
    bce = sum(bce_terms) / 4
    p0, p1 = (sig(2.0), sig(-1.0)), (sig(0.5), sig(3.0))
    dice0 = 1 - (2 * p0[0] + 1) / (sum(p0) + 1 + 1)
    dice1 = 1 - (2 * p1[1] + 1) / (sum(p1) + 1 + 1)
    got_bce, got_dice = mask_loss(logits, target, 2, 255, bce_weight=5.0, dice_weight=2.0)
    assert got_bce.item() == pytest.approx(5.0 * bce, rel=1e-6)
    assert got_dice.item() == pytest.approx(2.0 * (dice0 + dice1) / 2, rel=1e-6)


def test_mask_loss_dice_over_present_classes_matches_a_hand_computation():
    # two images, three classes, two pixels each. Image 0: classes 0 and 1 (class 2 absent); image 1: class 2 and an
    # ignored pixel (classes 0 and 1 absent, and class 0 is predicted there: a false positive).
    logits = torch.tensor(
        [
            [[[1.0, -2.0]], [[-1.0, 2.0]], [[0.5, 0.0]]],
            [[[3.0, 0.0]], [[-3.0, 0.0]], [[1.5, 9.0]]],
        ]
    )  # (2, 3, 1, 2)
    target = torch.tensor([[[0, 1]], [[2, 255]]])
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))

    def dice(probs, truth):
        inter = sum(p * t for p, t in zip(probs, truth))
        return 1 - (2 * inter + 1) / (sum(probs) + sum(truth) + 1)

    # image 1 counts only its first pixel (the second is ignored everywhere)
    d = {
        (0, 0): dice([sig(1.0), sig(-2.0)], [1, 0]),
        (0, 1): dice([sig(-1.0), sig(2.0)], [0, 1]),
        (0, 2): dice([sig(0.5), sig(0.0)], [0, 0]),
        (1, 0): dice([sig(3.0)], [0]),
        (1, 1): dice([sig(-3.0)], [0]),
        (1, 2): dice([sig(1.5)], [1]),
    }
    _, every = mask_loss(logits, target, 3, 255, dice_weight=2.0, dice_classes="all")
    _, present = mask_loss(logits, target, 3, 255, dice_weight=2.0, dice_classes="present")
    assert every.item() == pytest.approx(2.0 * sum(d.values()) / 6, rel=1e-6)
    assert present.item() == pytest.approx(2.0 * (d[0, 0] + d[0, 1] + d[1, 2]) / 3, rel=1e-6)
    # the BCE term does not depend on the option
    assert mask_loss(logits, target, 3, dice_classes="present")[0] == mask_loss(logits, target, 3)[0]
    # nothing valid: no present class, the Dice term is 0 (not NaN)
    _, none = mask_loss(logits, torch.full_like(target, 255), 3, dice_classes="present")
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="dice_classes"):
        mask_loss(logits, target, 3, dice_classes="absent")


def test_model_uses_the_dice_option():
    torch.manual_seed(SEED)
    model, batch = _tiny(mask_dice_classes="present").eval(), _batch()
    batch["mask"][0] = torch.where(batch["mask"][0] == 255, 255, batch["mask"][0] % 2)  # image 0: classes 0, 1 only
    got = model.loss(batch)
    with torch.no_grad():
        out = model.forward_head(batch["image"])
        wo_mask = F.interpolate(sum(out["masks"][:3]), size=(64, 64), mode="bilinear", align_corners=False)
        _, present = mask_loss(wo_mask, batch["mask"], K, 255, dice_classes="present")
        _, every = mask_loss(wo_mask, batch["mask"], K, 255, dice_classes="all")
    torch.testing.assert_close(got["mask_dice"], present)
    assert abs(float(present - every)) > 1e-3  # the option changes the loss on this batch
    with pytest.raises(ValueError, match="mask_dice_classes"):
        _tiny(mask_dice_classes="some")


def test_mask_loss_checks_shapes():
    with pytest.raises(ValueError, match="do not match"):
        mask_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long), 2)


def test_diversity_loss_matches_a_hand_computation():
    # 2 channels, 2 pixels: channel 0 = [a, 0], channel 1 = [0, b]
    a, b = 2.0, 1.0
    feat = torch.tensor([[[[a, 0.0]], [[0.0, b]]]])  # (1, 2, 1, 2)
    s0 = (math.exp(a) / (math.exp(a) + 1), 1 / (math.exp(a) + 1))
    s1 = (1 / (1 + math.exp(b)), math.exp(b) / (1 + math.exp(b)))
    expected = 1 - (max(s0[0], s1[0]) + max(s0[1], s1[1])) / 2
    assert diversity_loss([feat]).item() == pytest.approx(expected, rel=1e-6)
    # identical channels are the least diverse: loss 1 - 1/C' at uniform maps
    assert diversity_loss([torch.zeros(1, 4, 3, 3)]).item() == pytest.approx(1 - 1 / 4, rel=1e-6)
    # averaged over levels
    assert diversity_loss([feat, torch.zeros(1, 4, 3, 3)]).item() == pytest.approx((expected + 0.75) / 2, rel=1e-6)


def test_model_loss_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(SEED)
    model = _tiny().eval()  # eval: no dropout, BN on running stats, so the pieces can be recomputed
    batch = _batch()
    losses = model.loss(batch)
    assert set(losses) == {"loss", "ce", "mask_bce", "mask_dice", "div"}
    total = losses["ce"] + losses["mask_bce"] + losses["mask_dice"] + 0.2 * losses["div"]
    torch.testing.assert_close(losses["loss"].detach(), total)
    with torch.no_grad():
        out = model.forward_head(batch["image"])
        wo_mask = F.interpolate(sum(out["masks"][:3]), size=(64, 64), mode="bilinear", align_corners=False)
        bce, dice = mask_loss(wo_mask, batch["mask"], K, 255)
        ce = F.cross_entropy(model.upsample_logits(out["logits"], (64, 64)), batch["mask"], ignore_index=255)
    torch.testing.assert_close(losses["mask_bce"], bce)
    torch.testing.assert_close(losses["mask_dice"], dice)
    torch.testing.assert_close(losses["ce"], ce)
    torch.testing.assert_close(losses["div"], diversity_loss(out["diverse"]))


def test_loss_switches():
    torch.manual_seed(SEED)
    plain = _tiny(mask_loss_weight=0.0, div_loss_weight=0.0).eval().loss(_batch())
    assert set(plain) == {"loss", "ce"}
    torch.testing.assert_close(plain["loss"].detach(), plain["ce"])
    # "each": the mask loss is the mean of the losses of the three stage masks, not the loss of their sum.
    each_model, batch = _tiny(mask_loss_on="each").eval(), _batch()
    each = each_model.loss(batch)
    with torch.no_grad():
        masks = each_model.forward_head(batch["image"])["masks"][:3]
        parts = [
            mask_loss(F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False), batch["mask"], K, 255)
            for m in masks
        ]
    torch.testing.assert_close(each["mask_bce"], sum(p[0] for p in parts) / 3)
    torch.testing.assert_close(each["mask_dice"], sum(p[1] for p in parts) / 3)
    each["loss"].backward()
    with pytest.raises(ValueError, match="mask_loss_on"):
        _tiny(mask_loss_on="last")
    with pytest.raises(ValueError, match="impl"):
        _tiny(impl="cuda")


# --------------------------------------------------------------------------------------- Triton vs reference
def test_triton_and_torch_give_the_same_logits_and_gradients(count_fastseg_ops, triton_device):
    model = _tiny().eval().to(triton_device)
    x = torch.randn(1, 3, 64, 64, device=triton_device)
    batch = {"image": x, "mask": _batch(1)["mask"].to(triton_device)}
    results = {}
    calls = {}
    for impl in ("torch", "triton"):
        model.set_impl(impl)
        model.zero_grad()
        with count_fastseg_ops() as calls[impl]:
            logits = model(x)
            model.loss(batch)["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("transfer.") and "kv" in n}
        results[impl] = (logits.detach(), grads)
    # impl="triton" really launched the kernels: forward(x) and loss(batch) run 3 stages each, one backward.
    assert calls["triton"].triton == {"pixel_class_attention": 6, "pixel_class_attention_backward": 3}
    assert not calls["triton"].reference and not calls["torch"].triton
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------- ablation, options
def test_without_class_embeddings_has_no_ece_path_and_trains(gradient_check):
    model = _tiny(class_embeddings=False)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert {"learner", "token_emb", "gated_tokens"}.isdisjoint(names) and "class_table" in names
    out = model.eval().forward_head(torch.randn(1, 3, 64, 64))
    assert len(out["masks"]) == 3
    model.train()
    gradient_check.prepare(model)
    model.loss(_batch())["loss"].backward()
    assert not gradient_check.silent(model)


def test_sau_normalises_pixels_with_norm_low_and_classes_with_norm_high():
    # Spec B.3.2: q-input = LN(X) (pixels, per pixel over channels), kv-input = LN(E) (class embeddings).
    model = _tiny().eval()
    block = model.transfer[2]  # the first SAU stage (1/16), fed the lateral L3 and the ECE embeddings
    seen = {}

    def keep(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            seen.setdefault(name, (inputs, output))

        return hook

    for name, module in [
        ("low", block.norm_low),
        ("high", block.norm_high),
        ("attn", block.cross_attn),
        ("l3", model.laterals[2]),
        ("ece", model.token_emb[3]),
    ]:
        module.register_forward_hook(keep(name))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen["low"][0][0] is seen["l3"][1] and seen["high"][0][0] is seen["ece"][1]
    q_in, kv_in = seen["attn"][0]
    assert q_in is seen["low"][1] and kv_in is seen["high"][1]
    # both are LayerNorms over channels: zero mean, unit variance per pixel / per class (affine weights at init)
    torch.testing.assert_close(q_in.mean(1), torch.zeros_like(q_in.mean(1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(kv_in.mean(-1), torch.zeros_like(kv_in.mean(-1)), atol=1e-5, rtol=0)


def test_class_term_is_bounded_and_the_ablation_keeps_masks_and_fusion():
    torch.manual_seed(SEED)
    x = torch.randn(2, 3, 64, 64)
    for model in (_tiny().eval(), _tiny(class_embeddings=False).eval()):
        with torch.no_grad():
            out = model.forward_head(x)
        term = out["class_term"]
        assert term.min() >= 0 and term.max() <= 1  # moves each logit by at most 1
        with torch.no_grad():
            scores = torch.softmax(model.trans(_final_embeddings(model, x)), -1)
        diag = torch.diagonal(scores, dim1=1, dim2=2)
        torch.testing.assert_close(term, diag[:, :, None, None] * torch.stack(out["masks"]).sum(0).sigmoid())
    # Without class embeddings the per-class scalar is the same for every image (a static table).
    ablation = _tiny(class_embeddings=False).eval()
    emb = _final_embeddings(ablation, x)
    assert torch.equal(emb[0], emb[1])


def _final_embeddings(model: ECENet, x: torch.Tensor) -> torch.Tensor:
    """The class embeddings that reach ``trans`` (captured by a hook)."""
    seen = {}

    def hook(module, inputs, output):  # returns None: the output is left as it is
        seen.setdefault("emb", inputs[0])

    handle = model.trans.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["emb"]


def test_ece_learner_groups_follow_num_heads():
    # The port builds the 1/32 learner's first conv with groups=num_heads (4 in the official config): with another
    # head count its weight shape, and so the checkpoint, differs from a fixed 4 groups.
    for heads in (2, 8):
        model = _tiny(num_heads=heads)
        assert model.learner[0].groups == heads
        assert model.learner[0].weight.shape == (32, 32 // heads, 1, 1)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        _tiny(num_heads=3)


def test_bilinear_instead_of_ghost_upsampling():
    model = _tiny(ghost_up=False).eval()
    assert not hasattr(model, "ghost_up_layers")
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, K, 16, 24)


def test_registered_models():
    assert fastseg.list_models("ecenet*") == [
        "ecenet_resnet101",
        "ecenet_resnet18",
        "ecenet_resnet50",
        "ecenet_swin_base",
        "ecenet_swin_tiny",
    ]


# --------------------------------------------------------------------------------------- converter
_OFFICIAL_KEYS = [  # spec B.6 (one example per family), with fastseg's name after stripping ``decode_head.``
    "layer_slcts.3.primary.0.weight",
    "layer_slcts.0.primary.1.running_var",
    "layer_slcts.1.cheap.0.bias",
    "layer_slcts.2.layer_channel_slct.2.weight",
    "layer_slcts.0.conv_out.weight",
    "norms.2.weight",
    "laterals.3.weight",
    "learner.0.weight",
    "learner.1.weight",
    "token_emb.3.cls_learner.weight",
    "token_emb.0.cls_learner.bias",
    "transfer.1.norm_low.weight",
    "transfer.2.norm_high.bias",
    "transfer.0.norm_mlp.weight",
    "transfer.0.cross_attn.q.depthwise_conv.conv.weight",
    "transfer.2.cross_attn.q.pointwise_conv.conv.bias",
    "transfer.1.cross_attn.kv.weight",
    "transfer.0.cross_attn.proj.bias",
    "transfer.2.mlp.4.weight",
    "transfer.0.mlp.1.bias",
    "gated_tokens.2.dynamic_layer.weight",
    "gated_tokens.0.input_layer.bias",
    "gated_tokens.1.update_gate.weight",
    "gated_tokens.0.fc_layer.weight",
    "gated_tokens.2.norm_in.weight",
    "gated_tokens.1.norm_out.bias",
    "gated_tokens.0.fc_norm.weight",
    "ghost_up_layers.0.layers.0.primary.conv.weight",
    "ghost_up_layers.2.layers.2.cheap.bn.running_mean",
    "proj.conv.weight",
    "proj.bn.weight",
    "trans.bias",
    "conv_seg.weight",
]


def test_model_carries_the_official_names():
    keys = set(_tiny().state_dict())
    missing = [k for k in _OFFICIAL_KEYS if k not in keys]
    assert not missing, missing


def _official_state_dict(model: ECENet) -> dict[str, torch.Tensor]:
    """What an official checkpoint looks like: ``decode_head.`` names, conv-shaped channel MLP, mmseg backbone keys."""
    g = torch.Generator().manual_seed(SEED + 7)
    sd = {}
    for name, value in model.state_dict().items():
        if name.startswith("backbone.") or name.endswith("num_batches_tracked"):
            continue
        value = torch.randn(value.shape, generator=g) if value.is_floating_point() else value
        if name.endswith("running_var"):
            value = value.abs() + 0.5
        if "layer_channel_slct" in name:
            value = value[:, :, None, None]  # stored as 1x1 convs
        sd["decode_head." + name] = value
    sd["backbone.patch_embed.projection.weight"] = torch.randn(8, 3, 4, 4)  # mmseg Swin naming: not converted
    sd["decode_head.proj.bn.num_batches_tracked"] = torch.tensor(10)
    sd["auxiliary_head.conv_seg.weight"] = torch.randn(K, 8, 1, 1)
    return sd


def test_converter_loads_official_names_and_shapes():
    torch.manual_seed(SEED)
    model = _tiny().eval()
    official = _official_state_dict(model)
    # MindSpore naming of one LayerNorm
    official["decode_head.norms.0.gamma"] = official.pop("decode_head.norms.0.weight")
    official["decode_head.norms.0.beta"] = official.pop("decode_head.norms.0.bias")
    converted = convert_official_state_dict(official, model)
    fresh = _tiny().eval()
    fresh.load_state_dict(converted, strict=True)
    torch.testing.assert_close(fresh.norms[0].weight, official["decode_head.norms.0.gamma"])
    torch.testing.assert_close(
        fresh.layer_slcts[1].layer_channel_slct[0].weight,
        official["decode_head.layer_slcts.1.layer_channel_slct.0.weight"].flatten(1),
    )
    torch.testing.assert_close(
        fresh.gated_tokens[2].dynamic_layer.weight, official["decode_head.gated_tokens.2.dynamic_layer.weight"]
    )
    # backbone weights are the model's own (the official backbone uses mmseg names)
    torch.testing.assert_close(fresh.backbone.state_dict(), model.backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(fresh(x)).all()


def test_converter_without_a_model_returns_head_keys():
    converted = convert_official_state_dict(_official_state_dict(_tiny()))
    assert all(not k.startswith(("backbone.", "decode_head.", "auxiliary_head.")) for k in converted)
    assert "proj.bn.num_batches_tracked" not in converted and "trans.weight" in converted


def test_converter_names_the_problems():
    model = _tiny()
    official = _official_state_dict(model)
    del official["decode_head.trans.weight"]
    with pytest.raises(ValueError, match="missing key 'trans.weight'"):
        convert_official_state_dict(official, model)
    official = _official_state_dict(model)
    official["decode_head.conv_seg.weight"] = torch.randn(K + 1, 32, 1, 1)  # a checkpoint for another K
    with pytest.raises(ValueError, match="conv_seg.weight"):
        convert_official_state_dict(official, model)
    official = _official_state_dict(model)
    official["decode_head.not_a_module.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key 'not_a_module.weight'"):
        convert_official_state_dict(official, model)
    with pytest.raises(ValueError, match="not a tensor"):
        convert_official_state_dict({"decode_head.x": 3}, model)
