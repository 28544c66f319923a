"""Tests of the class-attention layers (`fastseg.layers.class_attention`, and ECENet's SAU block in
`fastseg.models.ecenet`) against plain re-implementations of ECENet's and Mask2Former's code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseg.kernels import interpreter_enabled
from fastseg.layers.class_attention import MaskedCrossAttentionLayer, attention_mask_from_logits
from fastseg.models.ecenet import ECENetSemanticsAttention, ECENetTransferBlock

# These layer tests run on CPU tensors: impl="triton" needs Triton's interpreter there (skipped, with the reason,
# elsewhere; the kernels themselves run natively on a CUDA host in tests/kernels).
TRITON_IMPLS = [
    "torch",
    "auto",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not interpreter_enabled(),
            reason="impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)",
        ),
    ),
]


def _ecenet_attention_plain(module: ECENetSemanticsAttention, x, classes):
    """ECENet's attention written out the way its code does it: rowmax(A) - A, head-mean of A as the mask."""
    bsz, channels, height, width = x.shape
    heads, d = module.num_heads, channels // module.num_heads
    q = module.q(x).reshape(bsz, heads, d, height * width).permute(0, 1, 3, 2)
    kv = module.kv(classes)
    k = kv[..., :channels].reshape(bsz, -1, heads, d).permute(0, 2, 1, 3)
    v = kv[..., channels:].reshape(bsz, -1, heads, d).permute(0, 2, 1, 3)
    attn = q @ k.transpose(-1, -2) * d**-0.5
    mask = attn.sum(1).transpose(1, 2).reshape(bsz, -1, height, width) / heads
    weights = (attn.max(-1, keepdim=True)[0].expand_as(attn) - attn).softmax(dim=-1)
    out = (weights @ v).permute(0, 1, 3, 2).reshape(bsz, channels, height, width)
    return module.proj(out), mask


@pytest.mark.parametrize("impl", TRITON_IMPLS)
def test_ecenet_attention_matches_plain_code(impl):
    module = ECENetSemanticsAttention(channels=32, num_heads=4, impl=impl)
    x, classes = torch.randn(2, 32, 5, 7), torch.randn(2, 19, 32)
    out, mask = module(x, classes)
    ref_out, ref_mask = _ecenet_attention_plain(module, x, classes)
    assert out.shape == (2, 32, 5, 7) and mask.shape == (2, 19, 5, 7)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mask, ref_mask, atol=2e-5, rtol=2e-5)
    (out.square().mean() + mask.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert all(bool(p.grad.ne(0).any()) for p in module.parameters()), "an all-zero parameter gradient"


def test_ecenet_transfer_block_shapes_and_checkpoint_keys():
    block = ECENetTransferBlock(channels=32, num_heads=4)
    x, classes = torch.randn(1, 32, 6, 6), torch.randn(1, 21, 32)
    out, mask = block(x, classes)
    assert out.shape == x.shape and mask.shape == (1, 21, 6, 6)
    keys = set(block.state_dict())
    for key in (
        "cross_attn.q.depthwise_conv.conv.weight",
        "cross_attn.q.pointwise_conv.conv.bias",
        "cross_attn.kv.weight",
        "cross_attn.proj.weight",
        "norm_low.weight",
        "norm_high.weight",
        "norm_mlp.bias",
        "mlp.0.weight",
        "mlp.1.weight",
        "mlp.4.weight",
    ):
        assert key in keys, key
    assert "cross_attn.kv.bias" not in keys  # ECENet's kv Linear has no bias
    with pytest.raises(ValueError, match="expected x"):
        block.cross_attn(torch.randn(1, 16, 6, 6), classes)


def _mask2former_reference(layer: MaskedCrossAttentionLayer, tgt, memory, mask_logits, pos, query_pos):
    """Mask2Former's CrossAttentionLayer.forward_post with nn.MultiheadAttention, sequence-first, its own mask."""
    mha = nn.MultiheadAttention(layer.d_model, layer.num_heads)
    mha.load_state_dict(layer.multihead_attn.state_dict())
    attn_mask = mask_logits.sigmoid().flatten(2).unsqueeze(1).repeat(1, layer.num_heads, 1, 1).flatten(0, 1) < 0.5
    attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
    seq = lambda t: t.transpose(0, 1)  # noqa: E731
    tgt2 = mha(seq(tgt + query_pos), seq(memory + pos), seq(memory), attn_mask=attn_mask)[0]
    return layer.norm(tgt + seq(tgt2))


@pytest.mark.parametrize("impl", TRITON_IMPLS)
def test_masked_cross_attention_layer_matches_mask2former(impl):
    torch.manual_seed(0)
    layer = MaskedCrossAttentionLayer(d_model=32, num_heads=4, impl=impl)
    bsz, num_q, height, width = 2, 10, 6, 5
    tgt, query_pos = torch.randn(bsz, num_q, 32), torch.randn(bsz, num_q, 32)
    memory, pos = torch.randn(bsz, height * width, 32), torch.randn(bsz, height * width, 32)
    mask_logits = torch.randn(bsz, num_q, height, width)
    mask_logits[:, 3] = -4.0  # empty predicted mask: that query attends everywhere
    mask = attention_mask_from_logits(mask_logits)
    out = layer(tgt, memory, mask, pos=pos, query_pos=query_pos)
    expected = _mask2former_reference(layer, tgt, memory, mask_logits, pos, query_pos)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert all(bool(p.grad.ne(0).any()) for p in layer.parameters()), "an all-zero parameter gradient"


def test_masked_cross_attention_pre_norm_and_mask_helper():
    layer = MaskedCrossAttentionLayer(d_model=16, num_heads=2, normalize_before=True, impl="torch")
    tgt, memory = torch.randn(1, 4, 16), torch.randn(1, 12, 16)
    normed = layer.norm(tgt)
    w_q, w_k, w_v = layer.multihead_attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.multihead_attn.in_proj_bias.chunk(3)
    split = lambda t: t.view(1, -1, 2, 8).transpose(1, 2)  # noqa: E731
    attn = F.scaled_dot_product_attention(
        split(F.linear(normed, w_q, b_q)), split(F.linear(memory, w_k, b_k)), split(F.linear(memory, w_v, b_v))
    )
    expected = tgt + layer.multihead_attn.out_proj(attn.transpose(1, 2).reshape(1, 4, 16))
    torch.testing.assert_close(layer(tgt, memory), expected, atol=2e-5, rtol=2e-5)
    logits = torch.tensor([[[[-1.0, 0.0], [2.0, -3.0]]]])
    assert attention_mask_from_logits(logits).tolist() == [[[False, True, True, False]]]
    assert attention_mask_from_logits(torch.randn(2, 3, 4, 4), size=(8, 6)).shape == (2, 3, 48)
    with pytest.raises(ValueError, match="mask_logits must be"):
        attention_mask_from_logits(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="divisible"):
        MaskedCrossAttentionLayer(d_model=30, num_heads=4)
