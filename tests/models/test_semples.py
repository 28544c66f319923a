"""SemPLeS: the three losses against plain recomputations of spec D.4, the detach points of each run, the fused ops
on the hot path, the CLIP prompt encoder, bad inputs, and resume of a crashed run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.checkpoint import save_weights
from fastseg.engine.recipes import semples as recipes
from fastseg.kernels import cam_masked_pairs_ref
from fastseg.models import semples as S
from fastseg.models import weaktr as W
from fastseg.models.clip import CLIP_CONFIGS, build_clip


def small_weaktr(**kw) -> W.WeakTr:
    torch.manual_seed(0)
    return fastseg.create_model("weaktr_shapes_tiny", embed_dim=48, depth=2, num_heads=2, reduction=1, **kw)


def aligned_clip():
    """The shapes-tiny CLIP with its final layer-norm biases set so that every embedding shares one direction:
    cosines then lie inside the clamp range (about 0.5 - 0.99), so that every loss term has a gradient."""
    torch.manual_seed(0)
    clip = build_clip("shapes-tiny-clip")
    model = clip.model
    target = torch.randn(model.text_projection.shape[1])
    with torch.no_grad():
        for norm, proj in ((model.visual.ln_post, model.visual.proj), (model.ln_final, model.text_projection)):
            norm.weight.mul_(0.05)
            norm.bias.copy_(torch.linalg.lstsq(proj.t(), target).solution)
    return clip


def unit(n: int, d: int = 16) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d), dim=-1)


# ------------------------------------------------------------------------------------------------------------------
# Losses against the formulas of D.4 (written out per pair)
# ------------------------------------------------------------------------------------------------------------------
def c(x: float) -> float:
    return min(max(x, 1e-4), 0.9999)


def dot(a, b) -> float:
    return float((a * b).sum())


def test_segment_label_matching_loss_formula():
    v_f, v_b, t = unit(5), unit(5), unit(5)
    out = S.segment_label_matching_loss(v_f, v_b, t, lambda_b=2.4)
    fg = sum(-math.log(c(dot(v_f[i], t[i]))) for i in range(5)) / 5
    bg = sum(-math.log(1 - c(dot(v_b[i], t[i]))) for i in range(5)) / 5
    assert float(out["loss"]) == pytest.approx(fg + 2.4 * bg, rel=1e-5)


def test_contrastive_prompt_loss_formula():
    v_b, t, p = unit(4), unit(4), unit(4)
    out = S.contrastive_prompt_loss(v_b, t, p, lambda_p=0.02)
    bg = sum(-math.log(c(dot(v_b[i], p[i]))) for i in range(4)) / 4
    text = sum(math.log(c(dot(t[i], p[i]))) for i in range(4)) / 4  # + log: minimises the similarity
    assert float(out["loss"]) == pytest.approx(bg + 0.02 * text, rel=1e-5)


def test_prompt_refinement_loss_formula():
    v_f, v_b, t, p = unit(6), unit(6), unit(6), unit(6)
    out = S.prompt_refinement_loss(v_f, v_b, t, p, lambda_b=2.4, lambda_r=0.05)
    a = float(S.segment_label_matching_loss(v_f, v_b, t, 2.4)["loss"])
    r = sum(-math.log(1 - c(dot(v_f[i], p[i]))) for i in range(6)) / 6
    assert float(out["loss"]) == pytest.approx(a + 0.05 * r, rel=1e-5)


def test_clamp_kills_gradients_outside_range():
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)  # cosine 1 with t: clamped at 0.9999
    t = torch.tensor([[1.0, 0.0]])
    loss = -torch.log(S.clamp_similarity((v * t).sum(-1))).mean()
    loss.backward()
    assert torch.all(v.grad == 0)


def test_positive_pairs_and_no_positive_class_error():
    labels = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    img, cls = S.positive_pairs(labels)
    assert img.tolist() == [0, 0, 1] and cls.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"images \[1\] of the batch have no positive class"):
        S.positive_pairs(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------------------------
# Runs: detach points and fused ops on the hot path
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip():
    return aligned_clip()


def make_run(clip, **kw) -> S.SemPLeSRun:
    model = small_weaktr()
    return S.SemPLeSRun(model, clip, model.pretrained_cfg.class_names[1:], prompt_length=30, **kw)


def batch(n: int = 3):
    torch.manual_seed(1)
    labels = torch.zeros(n, 8)
    labels[0, [1, 4]] = 1
    labels[1:, 0] = 1
    return torch.randn(n, 3, 32, 32), labels


def grads(params):
    return [p.grad for p in params]


@pytest.mark.parametrize("stage", ["a", "c"])
def test_runs_a_and_c_train_only_cam_head_and_aaf(clip, stage):
    run = make_run(clip)
    images, labels = batch()
    losses = (run.loss_a if stage == "a" else run.loss_c)(images, labels)
    losses["loss"].backward()
    backbone = run.cam_model.backbone_parameters()
    assert all(g is None or torch.all(g == 0) for g in grads(backbone)), "gradient reached the ViT backbone"
    assert all(not p.requires_grad and p.grad is None for p in clip.parameters()), "gradient reached CLIP"
    cam = run.cam_model.cam_parameters()
    assert all(g is not None for g in grads(cam)) and any(float(g.abs().sum()) > 0 for g in grads(cam))
    assert float(run.cam_model.head.weight.grad.abs().sum()) > 0
    assert float(run.cam_model.aaf.map_ffn[0].weight.grad.abs().sum()) > 0
    assert run.prompt_learner.prompts.grad is None  # prompts frozen in (c), unused in (a)


def test_run_b_trains_only_the_prompts(clip):
    run = make_run(clip)
    images, labels = batch()
    run.loss_b(images, labels)["loss"].backward()
    assert float(run.prompt_learner.prompts.grad.abs().sum()) > 0
    assert all(p.grad is None for p in run.cam_model.parameters())
    assert all(p.grad is None for p in clip.parameters())


def test_run_c_loss_equals_its_parts(clip):
    """L_c recomputed from the CLIP features of X_f, X_b, the class texts and the prompts, pair by pair."""
    run = make_run(clip)
    images, labels = batch()
    out = run.loss_c(images, labels)
    img, cls = S.positive_pairs(labels)
    with torch.no_grad():
        fine = run.cam_model.forward_cams(images)["fine"]
        masks = cam_masked_pairs_ref(images, fine, img, cls, 0.1)
        v_f, v_b = clip.encode_image(masks[0]), clip.encode_image(masks[1])
        t = clip.encode_text([f"a photo of {run.class_names[k]}." for k in cls.tolist()])
        p = clip.encode_prompts(run.prompt_learner.prompts)[cls]
    n = len(cls)
    expected = (
        sum(-math.log(c(dot(v_f[i], t[i]))) for i in range(n)) / n
        + 2.4 * sum(-math.log(1 - c(dot(v_b[i], t[i]))) for i in range(n)) / n
        + 0.05 * sum(-math.log(1 - c(dot(v_f[i], p[i]))) for i in range(n)) / n
    )
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-4)


def test_fused_ops_run_on_the_hot_path(clip, monkeypatch):
    calls = {"attention_fusion": 0, "cam_masked_pairs": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            assert kwargs.get("impl", "auto") != "torch"
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(W, "attention_fusion", counting("attention_fusion", W.attention_fusion))
    monkeypatch.setattr(S, "cam_masked_pairs", counting("cam_masked_pairs", S.cam_masked_pairs))
    run = make_run(clip)
    images, labels = batch()
    for loss in (run.loss_a, run.loss_b, run.loss_c):
        loss(images, labels)
    assert calls == {"attention_fusion": 3, "cam_masked_pairs": 3}


# ------------------------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------------------------
def test_prompt_encoder_equals_text_encoder_on_word_embeddings(clip):
    """Prompts made of real word embeddings must give exactly the text feature of that sentence (EOT at 35)."""
    sentence = "a photo of " + " ".join(["circle"] * 30) + "."
    tokens = clip.tokenize([sentence])[0]
    assert int(tokens.argmax()) == 35
    words = clip.model.token_embedding(tokens[4:34]).unsqueeze(0)
    torch.testing.assert_close(clip.encode_prompts(words), clip.encode_text([sentence]), atol=1e-5, rtol=1e-5)


def test_clip_is_frozen_and_passes_input_gradients(clip):
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    clip.encode_image(x).sum().backward()
    assert float(x.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.model.training


def test_clip_checkpoint_of_another_architecture_is_an_error(tmp_path, monkeypatch):
    other = {**CLIP_CONFIGS["shapes-tiny-clip"], "embed_dim": 32}
    monkeypatch.setitem(CLIP_CONFIGS, "other-clip", other)
    save_weights(build_clip("other-clip").model, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="is not a checkpoint of CLIP 'shapes-tiny-clip'"):
        build_clip("shapes-tiny-clip", tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unknown CLIP config"):
        build_clip("no-such-clip")
    with pytest.raises(ValueError, match="--clip-checkpoint"):
        build_clip("shapes-tiny-clip", None, require_checkpoint=True)


def test_class_list_must_match_the_prompts(clip, tmp_path):
    model = small_weaktr()
    with pytest.raises(ValueError, match="must match in order"):
        S.SemPLeSRun(model, clip, ["circle", "square"])
    with pytest.raises(ValueError, match="must match in order"):
        S.SemPLeSRun(model, clip, list(reversed(model.pretrained_cfg.class_names[1:])))
    # prompts learned for other classes cannot be loaded into run (c)
    run = make_run(clip)
    save_weights({"prompt_learner.prompts": torch.rand(3, 30, clip.width)}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="learned for 3 classes"):
        recipes.load_prompts(run, tmp_path / "b.safetensors")


# ------------------------------------------------------------------------------------------------------------------
# CAM inference, threshold sweep
# ------------------------------------------------------------------------------------------------------------------
def test_multiscale_cams_positive_classes_only():
    model = small_weaktr()
    images, labels = batch()
    cams = recipes.multiscale_cams(model, images, labels, scales=(1.0, 1.3))
    assert cams.shape == (3, 8, 32, 32)
    assert torch.all(cams[labels == 0] == 0)
    pos = cams[labels > 0]
    assert float(pos.amin()) >= 0 and float(pos.flatten(1).amax(1).min()) > 0.99
    pred = recipes.cams_to_labels(cams, 0.43)
    present = [set([0] + (labels[i].nonzero().flatten() + 1).tolist()) for i in range(3)]
    assert all(set(pred[i].unique().tolist()) <= present[i] for i in range(3))
    # the diagnostic CAM sources: WeakTr's intermediate maps through the same inference
    for source in ("cross", "fused"):
        other = recipes.multiscale_cams(model, images, labels, scales=(1.0,), flip=False, cam=source)
        expected = F.interpolate(model.forward_cams(images)[source], size=(32, 32), mode="bilinear")
        expected = expected * labels[..., None, None]
        low, high = expected.flatten(2).amin(-1), expected.flatten(2).amax(-1)
        expected = (expected - low[..., None, None]) / (high - low + 1e-8)[..., None, None] * labels[..., None, None]
        torch.testing.assert_close(other, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cam must be one of"):
        recipes.multiscale_cams(model, images, labels, cam="patch_attn")


def test_threshold_sweep_stops_at_first_drop(monkeypatch):
    curve = {0.40: 0.50, 0.41: 0.55, 0.42: 0.56, 0.43: 0.54, 0.44: 0.60}

    def fake(model, dataset, thresholds, **kw):
        return {t: {"mIoU": curve.get(round(t, 2), 0.0)} for t in thresholds}

    monkeypatch.setattr(recipes, "evaluate_cams", fake)
    out = recipes.sweep_threshold(None, None)
    assert out["threshold"] == 0.42 and out["metrics"]["mIoU"] == 0.56  # not the later 0.60
