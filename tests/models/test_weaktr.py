"""WeakTr: the explicit-attention blocks equal timm's, AAF and the fine CAM against plain recomputations, the
phase-1 loss formula, the two gradient paths, DeiT checkpoint loading and its architecture check."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import fastseg
from fastseg.checkpoint import save_weights
from fastseg.models.weaktr import WeakTr


def small(**kw) -> WeakTr:
    torch.manual_seed(0)
    return fastseg.create_model("weaktr_shapes_tiny", embed_dim=48, depth=2, num_heads=2, reduction=1, **kw)


def test_blocks_equal_timm_blocks():
    model = small().eval()
    x = torch.randn(2, 8 + 16, 48)
    for blk in model.blocks:
        out, attn, feats = WeakTr._block(blk, x)
        torch.testing.assert_close(out, blk(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 24))
        assert feats.shape == (2, 2, 24, 24)
        x = out


def test_aaf_and_fine_cam_recomputed():
    model = small().eval()
    images = torch.randn(2, 3, 32, 40)  # non-square grid: 4 x 5 patches
    out = model.forward_cams(images)
    k, p = 8, 20
    # recompute from the maps: weighted mean over the layer x head maps, then the fine-CAM product
    x = torch.cat([model.cls_tokens.expand(2, -1, -1), model.patch_embed(images)], 1) + model._pos_embed(4, 5)
    maps, feats = [], []
    for blk in model.blocks:
        x, a, f = WeakTr._block(blk, x)
        maps.append(a)
        feats.append(f)
    attn = torch.stack(maps, 1).flatten(1, 2)
    w = model.aaf.map_weights(torch.stack(feats, 1).flatten(1, 2))
    mean = (w[:, :, None, None] * attn).mean(1)
    cross, patch = mean[:, :k, k:], mean[:, k:, k:]
    coarse = model.head(x[:, k:].transpose(1, 2).reshape(2, 48, 4, 5))
    fused = cross.reshape(2, k, 4, 5) * F.relu(coarse)
    fine = torch.einsum("bpq,bkq->bkp", patch, fused.flatten(2)).reshape(2, k, 4, 5)
    torch.testing.assert_close(out["cross"], cross.reshape(2, k, 4, 5), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["patch_attn"], patch, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["fine"], fine, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["cls_logits"], x[:, :k].mean(-1), atol=1e-6, rtol=1e-5)
    assert p == 20


def test_aaf_weights_follow_the_authors_formula():
    """WeakTr / SemPLeS (`vision_transformer.Block` returns ``o = proj(attn @ v)``; `AAF.forward_weight`): the per-map
    features are each block's attention output *after* the projection, split into heads the interleaved way
    (channel c -> head c % H), max-pooled over the tokens, then ``Linear -> Linear`` (no activation between) to one
    scalar per map, then the map FFN with its sigmoid."""
    model = small().eval()
    with torch.no_grad():  # a non-zero first bias makes a hidden ReLU visible
        model.aaf.feat_ffn[0].bias.copy_(torch.linspace(-0.5, 0.5, model.aaf.feat_ffn[0].bias.numel()))
    images = torch.randn(2, 3, 32, 32)
    k, heads, dim = 8, 2, 48
    x = torch.cat([model.cls_tokens.expand(2, -1, -1), model.patch_embed(images)], 1) + model._pos_embed(4, 4)
    scalars = []
    for blk in model.blocks:
        attn_mod = blk.attn
        qkv = attn_mod.qkv(blk.norm1(x)).reshape(2, k + 16, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, kk, v = qkv.unbind(0)
        a = ((q * attn_mod.scale) @ kk.transpose(-2, -1)).softmax(-1)
        o = attn_mod.proj((a @ v).transpose(1, 2).reshape(2, k + 16, dim))  # upstream Block's third output
        for h in range(heads):
            pooled = o[:, :, h::heads].amax(1)  # (B, head_dim): channels of head h, max over the tokens
            lin1, lin2 = (m for m in model.aaf.feat_ffn if isinstance(m, torch.nn.Linear))
            scalars.append(lin2(lin1(pooled)).squeeze(-1))
        x = x + o
        x = x + blk.mlp(blk.norm2(x))
    expected = model.aaf.map_ffn(torch.stack(scalars, 1))  # layer-major map order, as the model's
    torch.testing.assert_close(model.forward_cams(images)["aaf_weights"], expected, atol=1e-5, rtol=1e-5)


def test_phase1_loss_is_the_sum_of_three_soft_margin_losses():
    model = small()
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0, 0]])
    torch.manual_seed(0)
    losses = model.loss({"image": images, "image_labels": labels})
    out = model.forward_cams(images)

    def soft_margin(x, y):  # -mean_k [y log sigmoid(x) + (1 - y) log sigmoid(-x)], mean over images
        return -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean(1).mean()

    expected = sum(soft_margin(out[n], labels) for n in ("cls_logits", "coarse_logits", "fine_logits"))
    torch.testing.assert_close(losses["loss"], expected, atol=1e-5, rtol=1e-5)


def test_gradient_paths():
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0] + [0] * 7, [0, 1.0] + [0] * 6])
    model = small()
    model.loss({"image": images, "image_labels": labels})["loss"].backward()
    assert float(model.blocks[0].attn.qkv.weight.grad.abs().sum()) > 0  # phase 1 trains the backbone
    assert float(model.cls_tokens.grad.abs().sum()) > 0
    model = small(detach_backbone=True)
    model.forward_cams(images)["fine"].sum().backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    assert float(model.head.weight.grad.abs().sum()) > 0  # SemPLeS: the fused CAM keeps the head's gradient


def test_fine_cam_loss_trains_aaf_only_and_is_bounded_by_its_negatives():
    """Why the phase-1 fine-CAM loss sits near ln 2 (as upstream's does): its logits are GAPs of non-negative maps
    (attention x ReLU(coarse)), so every absent class costs at least ln 2, and its only trainable path is the AAF
    weights (maps and head features detached, coarse CAM detached in phase 1): it is not a dead branch."""
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0] + [0] * 7, [0, 1.0, 1.0] + [0] * 5])
    model = small()
    out = model.forward_cams(images)
    assert float(out["fine"].detach().min()) >= 0
    fine_loss = F.multilabel_soft_margin_loss(out["fine_logits"], labels)
    negatives = float((1 - labels).sum(1).mean() / labels.shape[1])
    assert float(fine_loss.detach()) >= negatives * math.log(2) - 1e-6
    fine_loss.backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in model.aaf.parameters())
    assert model.head.weight.grad is None and all(p.grad is None for p in model.backbone_parameters())


def test_deit_checkpoint_loading_and_architecture_check(tmp_path):
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    save_weights(deit, tmp_path / "deit_tiny.safetensors")
    model = fastseg.create_model(
        "weaktr_deit_tiny", num_classes=21, backbone_checkpoint=tmp_path / "deit_tiny.safetensors"
    )
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, deit.blocks[3].mlp.fc1.weight)
    torch.testing.assert_close(model.cls_tokens[0, 19], deit.cls_token[0, 0])
    assert model.pos_embed.shape == (1, 20 + 196, 192)
    with pytest.raises(ValueError, match="is not a DeiT checkpoint of this architecture"):
        fastseg.create_model("weaktr_shapes_tiny", backbone_checkpoint=tmp_path / "deit_tiny.safetensors")
