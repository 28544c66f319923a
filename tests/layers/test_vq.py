"""Tests of the layers over the `vq` kernels: VectorQuantizer, PaletteInverse, ArgmaxTokenHead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg.kernels._utils import interpreter_enabled
from fastseg.layers.vq import ArgmaxTokenHead, PaletteInverse, VectorQuantizer

needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (Triton on CPU)")
IMPLS = ["auto", pytest.param("triton", marks=needs_interpreter)]


def _brute_nearest(flat, codebook):
    return torch.cdist(flat.double(), codebook.double()).argmin(1)


@pytest.mark.parametrize("impl", IMPLS)
def test_vector_quantizer_forward_losses_and_straight_through(impl):
    vq = VectorQuantizer(num_codes=16, dim=6, beta=0.25, impl=impl)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(2, 6, 3, 5, requires_grad=True)
    out = vq(z)
    flat = z.detach().movedim(1, -1).reshape(-1, 6)
    assert out.indices.shape == (2, 3, 5) and out.quantized.shape == z.shape
    assert torch.equal(out.indices.reshape(-1), _brute_nearest(flat, vq.codebook.detach()))
    codes = vq.codebook.detach()[out.indices].movedim(-1, 1)
    torch.testing.assert_close(out.quantized, codes)
    mse = F.mse_loss(z.detach(), codes)
    torch.testing.assert_close(out.commitment_loss, mse)
    torch.testing.assert_close(out.codebook_loss, mse)
    torch.testing.assert_close(out.loss, 1.25 * mse)
    # gradients: straight-through for the output, beta * commitment to z, codebook loss to the codebook only
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().add(out.loss).backward()
    expected_z = upstream + 0.25 * 2 * (z.detach() - codes) / z.numel()
    torch.testing.assert_close(z.grad, expected_z, rtol=1e-5, atol=1e-6)
    residual = (codes - z.detach()).movedim(1, -1).reshape(-1, 6)
    expected_cb = torch.zeros(16, 6).index_add_(0, out.indices.reshape(-1), 2 * residual / z.numel())
    torch.testing.assert_close(vq.codebook.grad, expected_cb, rtol=1e-5, atol=1e-6)
    assert 1.0 <= float(out.perplexity) <= 16.0


def test_vector_quantizer_channel_last_eval_and_lookup():
    vq = VectorQuantizer(num_codes=8, dim=4, channel_dim=-1).eval()
    z = torch.randn(3, 7, 4)
    with torch.no_grad():
        out = vq(z)
    assert out.indices.shape == (3, 7)
    assert torch.equal(out.quantized, vq.lookup(out.indices))  # exact codes when no gradient is needed
    with pytest.raises(ValueError, match="expected 4 features on axis -1"):
        vq(torch.randn(3, 7, 5))
    empty = vq(torch.randn(0, 5, 4))
    assert empty.indices.shape == (0, 5) and float(empty.loss) == 0.0


def test_vector_quantizer_ema_moves_codes_to_cluster_means_and_restarts_dead_codes():
    torch.manual_seed(3)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -6.0]])
    vq = VectorQuantizer(num_codes=6, dim=2, ema=True, decay=0.8, dead_code_threshold=0.05, channel_dim=-1)
    assert not vq.codebook.requires_grad
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(6, 2) * 0.1)
        vq.embed_sum.copy_(vq.codebook)
    for _ in range(60):
        z = centres[torch.randint(0, 3, (256,))] + 0.1 * torch.randn(256, 2)
        out = vq(z)
    assert float(out.codebook_loss) == 0.0
    # every cluster centre is now represented by a code within its spread (dead codes were restarted onto data)
    nearest = torch.cdist(centres, vq.codebook.detach()).min(1).values
    assert bool((nearest < 0.3).all()), nearest
    assert float(out.commitment_loss) < 0.05


def test_vector_quantizer_training_reduces_loss():
    torch.manual_seed(0)
    data = torch.randn(512, 8)
    vq = VectorQuantizer(num_codes=32, dim=8, channel_dim=-1, dead_code_threshold=0.01)
    opt = torch.optim.Adam(vq.parameters(), lr=0.05)
    first = None
    for _ in range(40):
        loss = vq(data).loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(vq(data).loss) < 0.5 * first


@pytest.mark.parametrize("impl", IMPLS)
def test_palette_inverse(impl):
    palette = torch.randint(0, 256, (150, 3)).float()
    labels = torch.randint(0, 150, (2, 9, 11))
    rgb = palette[labels].permute(0, 3, 1, 2) + torch.empty(2, 3, 9, 11).uniform_(-3, 3)
    inverse = PaletteInverse(palette, impl=impl)
    got = inverse(rgb)
    assert got.shape == (2, 9, 11) and got.dtype == torch.int64
    flat = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    d = torch.cdist(flat.double(), palette.double())
    chosen = d.gather(1, got.reshape(-1, 1)).squeeze(1)
    assert bool((chosen <= d.min(1).values + 1e-6).all())
    # uint8 images of exact palette colours invert exactly (unique colours)
    unique_palette = torch.stack([torch.arange(150), 255 - torch.arange(150), torch.arange(150) % 7], 1).float()
    exact = PaletteInverse(unique_palette, impl=impl)(unique_palette[labels].permute(0, 3, 1, 2).to(torch.uint8))
    assert torch.equal(exact, labels)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        inverse(torch.rand(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"palette must be \(K, 3\)"):
        PaletteInverse(torch.rand(5, 4))


@pytest.mark.parametrize("impl", IMPLS)
def test_argmax_token_head(impl):
    head = ArgmaxTokenHead(in_channels=12, num_tokens=70, impl=impl)
    x = torch.randn(2, 12, 5, 3)
    logits = head.train()(x)
    assert logits.shape == (2, 70, 5, 3)
    ids = head.eval()(x)
    assert ids.shape == (2, 5, 3) and ids.dtype == torch.int64
    chosen = logits.detach().gather(1, ids[:, None]).squeeze(1)
    assert bool((logits.detach().max(1).values - chosen <= 1e-5).all())
    with pytest.raises(ValueError, match=r"expected \(B, 12, H, W\)"):
        head(torch.randn(2, 11, 5, 3))
    no_bias = ArgmaxTokenHead(12, 70, bias=False, impl=impl).eval()
    assert torch.equal(no_bias(x), no_bias.conv(x).argmax(1))


@pytest.mark.parametrize("ema, dead_code_threshold", [(True, 0.0), (False, 0.5), (True, 0.5)])
def test_codebook_updates_in_training_keep_backward_working(ema, dead_code_threshold):
    # The EMA update and the dead-code restart write the codebook in place during forward; the search's backward
    # must still see the codes it searched (regression: "modified by an inplace operation").
    vq = VectorQuantizer(16, 4, ema=ema, dead_code_threshold=dead_code_threshold).train()
    vq.cluster_size.zero_()  # every code starts unused, so a restart (when enabled) must fire
    before = vq.codebook.detach().clone()
    z = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = vq(z)
    (out.quantized.square().sum() + out.loss).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert not torch.equal(vq.codebook.detach(), before)  # the update did happen
