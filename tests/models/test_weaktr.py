"""WeakTr: the explicit-attention blocks equal timm's, AAF and the fine CAM against plain recomputations, the
phase-1 loss formula, the two gradient paths, DeiT checkpoint loading and its architecture check."""

from __future__ import annotations

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
    torch.testing.assert_close(out["patch_attn"], patch, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["fine"], fine, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["cls_logits"], x[:, :k].mean(-1), atol=1e-6, rtol=1e-5)
    assert p == 20


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
