"""PADing stage-2 pieces against plain recomputations of the spec's formulas (C.4 - C.6)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseg.models.pading import (
    GMMNGenerator,
    PADingHead,
    PrimitiveGenerator,
    PrimitiveGeneratorLayer,
    RelationModule,
    cosine_similarity_matrix,
    mmd_loss,
    similarity_kl,
)

SIGMAS = (2, 5, 10, 20, 40, 80)


def plain_mmd(f, e):
    def mean_k(x, y, s):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s)) for a in x for b in y) / (len(x) * len(y))

    return math.sqrt(sum(mean_k(f, f, s) + mean_k(e, e, s) - 2 * mean_k(f, e, s) for s in SIGMAS))


@pytest.mark.parametrize("m,n", [(1, 1), (7, 7), (5, 9)])
def test_mmd_matches_naive_formula(m, n):
    g = torch.Generator().manual_seed(m * 10 + n)
    f = torch.randn(m, 16, generator=g, dtype=torch.float64)
    e = torch.randn(n, 16, generator=g, dtype=torch.float64) + 0.5
    assert float(mmd_loss(f, e)) == pytest.approx(plain_mmd(f, e), rel=1e-5, abs=1e-6)


def test_mmd_gradient_and_bad_input():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(6, 8, generator=g, dtype=torch.float64) * 2
    # The reference: the official s^T K s form written out with all six Gram matrices.
    x = torch.cat([f, e])
    d2 = torch.cdist(x, x) ** 2
    s = torch.cat([torch.full((6,), 1 / 6), torch.full((6,), -1 / 6)]).double()
    ref = torch.sqrt(sum(s @ torch.exp(-d2 / (2 * sig)) @ s for sig in SIGMAS))
    (g_ref,) = torch.autograd.grad(ref, f)
    (g_out,) = torch.autograd.grad(mmd_loss(f, e), f)
    torch.testing.assert_close(g_out.double(), g_ref, rtol=1e-4, atol=1e-6)
    # Identical sets: zero, finite gradient (the clamp before the square root).
    z = torch.randn(4, 8, requires_grad=True)
    loss = mmd_loss(z, z.detach())
    loss.backward()
    assert float(loss.detach()) < 1e-5 and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="at least one"):
        mmd_loss(torch.zeros(0, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="expects"):
        mmd_loss(torch.zeros(2, 8), torch.zeros(3, 7))


def plain_kl(pred, target, t=0.1):
    log_pp = pred / t - torch.logsumexp(pred / t, dim=1, keepdim=True)
    log_pt = target / t - torch.logsumexp(target / t, dim=1, keepdim=True)
    return (log_pt.exp() * (log_pt - log_pp)).sum() / pred.numel()


def test_similarity_kl_formula_and_gradients_into_both_sides():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = similarity_kl(pred, target)
    ref = plain_kl(pred, target)
    torch.testing.assert_close(out, ref)
    g_out = torch.autograd.grad(out, (pred, target))
    g_ref = torch.autograd.grad(ref, (pred, target))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0
    x, y = torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g)
    plain = torch.tensor([[float(a @ b / a.norm() / b.norm()) for b in y] for a in x])
    torch.testing.assert_close(cosine_similarity_matrix(x, y), plain)


def official_style_layer_forward(layer: PrimitiveGeneratorLayer, x, prims, noise):
    """The official post-norm decoder layer with nn.MultiheadAttention on (L=1, N, d) and a memory repeated N times."""
    tgt = x[None]
    memory = prims[:, None, :].repeat(1, x.shape[0], 1)
    tgt = layer.norm1(tgt + layer.self_attn(tgt, tgt, tgt)[0])
    tgt = tgt + layer.cross_attn(tgt, memory, memory)[0]
    tgt = layer.norm2(tgt + noise[None])
    tgt = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
    return tgt[0]


def test_generator_layer_equals_official_layer_with_explicit_noise():
    torch.manual_seed(0)
    layer = PrimitiveGeneratorLayer(dim=32, heads=4, ffn_dim=64, dropout=0.1).eval()
    prims = torch.randn(40, 32)
    x = torch.randn(6, 32)
    noise = torch.randn(6, 32)
    out = layer(x, layer.primitive_kv(prims), noise)
    ref = official_style_layer_forward(layer, x, prims, noise)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Noise is injected in eval mode too: two draws differ; without noise the layer is deterministic in eval.
    a, b = layer(x, layer.primitive_kv(prims)), layer(x, layer.primitive_kv(prims))
    assert (a - b).abs().max() > 1e-3
    layer.noise = False
    torch.testing.assert_close(layer(x, layer.primitive_kv(prims)), layer(x, layer.primitive_kv(prims)))


def test_generator_shares_primitive_kv_and_stacks_layers(monkeypatch):
    torch.manual_seed(0)
    gen = PrimitiveGenerator(dim=32, num_primitives=40, num_layers=3, heads=4, ffn_dim=64).eval()
    # All layers start equal (the official decoder deep-copies one layer).
    torch.testing.assert_close(gen.layers[0].linear1.weight, gen.layers[2].linear1.weight)
    calls = []
    original = PrimitiveGeneratorLayer.primitive_kv

    def spy(self, p):
        calls.append(p.shape)
        return original(self, p)

    monkeypatch.setattr(PrimitiveGeneratorLayer, "primitive_kv", spy)
    a = torch.randn(25, 32)
    noise = [torch.randn(25, 32) for _ in range(3)]
    out = gen(a, noise)
    assert len(calls) == 3 and all(c == (40, 32) for c in calls)  # once per layer, never per class
    x = a
    for layer, eps in zip(gen.layers, noise):
        x = official_style_layer_forward(layer, x, gen.primitives.weight, eps)
    torch.testing.assert_close(out, gen.norm(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one noise tensor per layer"):
        gen(a, noise[:2])


def test_generator_train_mode_dropout_matches_mha_statistics():
    # With dropout, the single self-attention weight is dropped per (token, head): outputs stay finite and vary.
    torch.manual_seed(0)
    layer = PrimitiveGeneratorLayer(dim=16, heads=2, ffn_dim=32, dropout=0.5).train()
    x, prims = torch.randn(8, 16), torch.randn(10, 16)
    out = layer(x, layer.primitive_kv(prims), torch.zeros(8, 16))
    assert out.shape == (8, 16) and torch.isfinite(out).all()


def test_relation_module_equals_concat_pairs():
    torch.manual_seed(0)
    rel = RelationModule(dim=12)
    x, a = torch.randn(5, 12), torch.randn(3, 12)
    pairs = torch.cat([x[:, None].expand(5, 3, 12), a[None].expand(5, 3, 12)], -1).reshape(15, 24)
    ref = torch.sigmoid(rel.fc2(F.relu(rel.fc1(pairs)))).view(5, 3)
    torch.testing.assert_close(rel(x, a), ref)


def test_gmmn_generator_concatenates_noise():
    torch.manual_seed(0)
    gen = GMMNGenerator(dim=8, hidden=16).eval()
    a, z = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(gen(a, z), gen.net(torch.cat([a, z], 1)))


# ------------------------------------------------------------------------------------------------- the full head
K, SEEN, UNSEEN, D = 6, [0, 1, 3, 4], [2, 5], 16


def make_head(**kw):
    torch.manual_seed(0)
    emb = torch.randn(K, 10)
    opts = dict(
        dim=D,
        num_primitives=12,
        num_layers=2,
        heads=2,
        ffn_dim=32,
        trans_dropout=0.0,
        ed_dropout=0.0,
        structure_weight=0.3,
        num_choose=1,
    )
    opts.update(kw)
    return PADingHead(emb, SEEN, UNSEEN, **opts)


def plain_ce(logits, target, weight=None):
    logp = logits - torch.logsumexp(logits, 1, keepdim=True)
    w = torch.ones(logits.shape[1], dtype=logits.dtype) if weight is None else weight
    picked = torch.stack([-logp[i, t] * w[t] for i, t in enumerate(target)])
    return picked.sum() / w[target].sum()


def plain_structure(head, fs, fu, a_all, labels, zs, zu):
    """Spec C.6 3-6 written out: E_r / E_u / D / R applied by hand (dropout 0), relation pairs concatenated."""
    er, eu, dec, rel = head.encoder_related, head.encoder_unrelated, head.decoder, head.relation

    def enc(m, x):
        return F.leaky_relu(m[1](m[0](x)), 0.2)

    def decode(x):
        return F.leaky_relu(dec[3](F.leaky_relu(dec[0](x), 0.2)), 0.2)

    def relation(x, a):
        pairs = torch.cat([x[:, None].expand(-1, len(a), -1), a[None].expand(len(x), -1, -1)], -1)
        return torch.sigmoid(rel.fc2(F.relu(rel.fc1(pairs)))).squeeze(-1)

    r_s, u_s, r_u, u_u = enc(er, fs), enc(eu, fs), enc(er, fu), enc(eu, fu)
    a_s, a_u = a_all[labels], a_all[UNSEEN]
    rec = (
        (decode(torch.cat([r_s, u_s], 1)) - fs).abs().mean() + (decode(torch.cat([r_u, u_u], 1)) - fu).abs().mean()
    ) / 2
    unrel = 0.25 * (plain_kl(u_s, zs) + plain_kl(u_u, zu))
    rel_loss = 0.1 * (plain_ce(relation(r_s, a_all), labels) + plain_ce(relation(r_u, a_u), torch.arange(2)))

    def cos(x, y):
        return (x / x.norm(dim=1, keepdim=True)) @ (y / y.norm(dim=1, keepdim=True)).t()

    align = (
        plain_kl(cos(r_s, r_s), cos(a_s, a_s))
        + plain_kl(cos(r_u, r_u), cos(a_u, a_u))
        + plain_kl(cos(r_s, r_u), cos(a_s, a_u))
    ) / 3
    return {
        "rec": rec,
        "unrelated": unrel,
        "relation": rel_loss,
        "align": align,
        "structure": align + unrel + rel_loss + 0.5 * rec,
    }


def test_structure_losses_match_plain_recomputation():
    head = make_head()
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 3, 3, 4, 1])
    fs, fu = torch.randn(5, D, generator=g), torch.randn(2, D, generator=g)
    zs, zu = torch.randn(5, D, generator=g), torch.randn(2, D, generator=g)
    a_all = head.projection(head.class_embeddings)
    out = head.structure_losses(fs, fu, a_all, labels, zs, zu)
    ref = plain_structure(head, fs, fu, a_all, labels, zs, zu)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_alignment_gradient_reaches_projected_embeddings():
    head = make_head()
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 1, 4])
    fs, fu = torch.randn(3, D, generator=g), torch.randn(2, D, generator=g)
    a_all = head.projection(head.class_embeddings).detach().requires_grad_(True)
    align = head.structure_losses(fs, fu, a_all, labels)["align"]
    (grad,) = torch.autograd.grad(align, a_all)
    a_ref = a_all.detach().clone().requires_grad_(True)
    ref = plain_structure(head, fs, fu, a_ref, labels, torch.zeros(3, D), torch.zeros(2, D))["align"]
    (grad_ref,) = torch.autograd.grad(ref, a_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)
    # Seen rows 0, 1, 4 and both unseen rows receive gradient; class 3 (not in the batch, not unseen) none.
    assert (grad[[0, 1, 4, 2, 5]].abs().sum(1) > 0).all() and float(grad[3].abs().sum()) == 0.0
    # Through the head: the projection's weights get it.
    head.zero_grad()
    head.structure_losses(fs, fu, head.projection(head.class_embeddings), labels)["align"].backward()
    assert head.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls_logits", ["all", "seen"])
def test_generator_losses_total_matches_plain(cls_logits):
    head = make_head(cls_logits=cls_logits)
    g = torch.Generator().manual_seed(5)
    real = torch.randn(4, D, generator=g)
    labels = torch.tensor([1, 0, 4, 1])
    torch.manual_seed(11)
    out = head.generator_losses(real, labels)
    # Replay with the same RNG stream: the generator's noise (one draw per layer), then the two unrelated targets.
    torch.manual_seed(11)
    a_all = head.projection(head.class_embeddings)
    fake = head.generator(torch.cat([a_all[labels], a_all[UNSEEN]]))
    fs, fu = fake[:4], fake[4:]
    zs, zu = torch.randn(4, D), torch.randn(2, D)
    ref = plain_structure(head, fs, fu, a_all, labels, zs, zu)
    logits = head.new_fc(fs)
    if cls_logits == "seen":
        cls = 1e-3 * plain_ce(logits[:, SEEN], torch.tensor([SEEN.index(int(y)) for y in labels]))
    else:
        cls = 1e-3 * plain_ce(logits, labels)
    mmd = plain_mmd(fs.double().detach(), real.double())
    torch.testing.assert_close(out["cls"], cls, rtol=1e-5, atol=1e-8)
    assert float(out["mmd"]) == pytest.approx(mmd, rel=1e-4)
    torch.testing.assert_close(out["structure"], ref["structure"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["mmd"] + cls + 0.3 * ref["structure"], rtol=1e-5, atol=1e-6)


def test_classifier_loss_weights_and_only_new_fc_learns():
    head = make_head(class_eco=5.0, num_choose=2, no_object_weight=0.1)
    g = torch.Generator().manual_seed(6)
    queries = torch.randn(9, D, generator=g, requires_grad=True)
    labels = torch.tensor([K, K, 0, 3, K, 1, K, 4, K])  # K = no-object
    torch.manual_seed(2)
    out = head.classifier_loss(queries, labels, generator=torch.Generator().manual_seed(7))
    out["loss"].backward()
    assert head.new_fc.weight.grad is not None
    assert all(p.grad is None for p in head.generator_parameters())
    assert queries.grad is None
    # Replay: the same pick and the same generator noise, then the weighted CE by hand.
    pick = torch.randperm(2, generator=torch.Generator().manual_seed(7))[:2]
    torch.manual_seed(2)
    with torch.no_grad():
        fake = head.generator(head.projection(head.class_embeddings[torch.tensor(UNSEEN)[pick]]))
        logits = head.new_fc(torch.cat([queries, fake]))
    weight = torch.tensor([1, 1, 5, 1, 1, 5, 0.1])
    ref = plain_ce(logits, torch.cat([labels, torch.tensor(UNSEEN)[pick]]), weight)
    torch.testing.assert_close(out["loss"].detach(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.classifier_class_weights(), weight)


def test_head_bad_splits():
    emb = torch.randn(4, 5)
    with pytest.raises(ValueError, match="no unseen class"):
        PADingHead(emb, [0, 1, 2, 3], [])
    with pytest.raises(ValueError, match="no seen class"):
        PADingHead(emb, [], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="partition"):
        PADingHead(emb, [0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="generator must be"):
        PADingHead(emb, [0, 1], [2, 3], generator="gan")
    head = PADingHead(emb, [0, 1], [2, 3], dim=8, num_primitives=4, num_layers=1, heads=2, ffn_dim=8)
    with pytest.raises(ValueError, match="at least one matched"):
        head.generator_losses(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert isinstance(head.generator, nn.Module)
