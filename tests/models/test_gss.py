"""GSS: maskige X / X^-1, training targets (spec A.4), tokenizers (DALL-E parity, converter safety), fused vs
reference inference, stages, export. The model contract itself is covered by test_model_contract.py."""

import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.engine.recipes.gss import fit_image_tokenizer, roundtrip_miou, train_maskige_vqvae
from fastseg.layers.vq import PaletteInverse
from fastseg.models.gss import (
    TOKENIZER_TRAINED_ON,
    GSSSegmenter,
    fill_ignore,
    fill_ignore_from_neighbours,
    make_maskige_palette,
    masks_to_maskige,
    palette_inverse_ref,
    palette_min_distance,
    token_ignore_mask,
    upsample_labels,
)
from fastseg.models.gss_tokenizers import (
    DalleDVAE,
    MaskigeVQVAE,
    convert_dalle_pickle,
    map_pixels,
    unmap_pixels,
)

SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)

K = 12


@pytest.fixture(scope="module")
def ff():
    torch.manual_seed(SEED)
    return fastseg.create_model("gss_ff_resnet18", num_classes=K).eval()


# ---- maskige ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 12, 19, 150])
def test_palette_rule(k):
    pal = make_maskige_palette(k)
    assert pal.shape == (k + 1, 3) and pal.min() >= 0 and pal.max() <= 255
    assert torch.equal(pal, pal.round())
    assert torch.equal(pal, make_maskige_palette(k))  # seeded
    assert not torch.equal(pal, make_maskige_palette(k, seed=1))  # jittered
    chroma = pal.max(1).values - pal.min(1).values
    assert chroma.min() >= 48 - 2 * 15  # greys avoided (grid chroma >= 48 before a +-15 jitter per channel)
    # Min pairwise distance (the GSS quality bound) over all K + 1 rows, ignore colour included.
    assert palette_min_distance(pal) >= 20, palette_min_distance(pal)


def test_palette_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        make_maskige_palette(0)
    with pytest.raises(ValueError, match="cannot place"):
        make_maskige_palette(5000)


@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_maskige_round_trip_exact_on_clean_masks(impl, request):
    device = request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")
    pal = make_maskige_palette(K).to(device)
    masks = torch.randint(0, K, (2, 9, 13)).to(device)
    masks[0, :3, :3] = 255
    maskige = masks_to_maskige(masks, pal)
    assert maskige.shape == (2, 3, 9, 13) and 0 <= maskige.min() and maskige.max() <= 1
    assert torch.equal(maskige[0, :, 0, 0] * 255, pal[K])  # ignore -> the ignore row
    inv = PaletteInverse(pal[:K], impl=impl)(maskige * 255)
    clean = masks != 255
    assert torch.equal(inv[clean], masks[clean])
    assert int(inv.max()) < K  # the ignore row is never returned
    assert torch.equal(palette_inverse_ref(maskige * 255, pal[:K]), inv)


def test_upsample_labels_and_ignore_rules_hand_checked():
    masks = torch.tensor([[[0, 1], [255, 2]]])
    # Scale 1 is the identity; at scale 2 the one-hot bilinear + argmax is the nearest 2x2 block (own weight 9/16).
    assert torch.equal(upsample_labels(masks, 1, 3), masks)
    up = upsample_labels(masks, 2, 3)
    assert torch.equal(up, masks.repeat_interleave(2, 1).repeat_interleave(2, 2))
    # Ignore pixels take the auxiliary prediction; others keep their label.
    fill = torch.full_like(masks, 7)
    assert torch.equal(fill_ignore(masks, fill), torch.tensor([[[0, 1], [7, 2]]]))
    with pytest.raises(ValueError, match="fill shape"):
        fill_ignore(masks, fill[:, :1])
    # Without a predictor, ignore pixels take their labelled neighbours' majority, spreading inwards step by step.
    assert torch.equal(fill_ignore_from_neighbours(torch.tensor([[[0, 255, 1]]]), 3), torch.tensor([[[0, 0, 1]]]))
    line = torch.tensor([[[2, 255, 255, 255]]])
    assert torch.equal(fill_ignore_from_neighbours(line, 3), torch.full_like(line, 2))
    block = torch.tensor([[[1, 1, 0], [1, 255, 0], [1, 1, 0]]])  # five 1s, three 0s around the centre
    assert int(fill_ignore_from_neighbours(block, 3)[0, 1, 1]) == 1
    blank = torch.full((1, 2, 2), 255)
    assert torch.equal(fill_ignore_from_neighbours(blank, 3), blank)  # nothing to spread from: stays ignore
    stray = torch.tensor([[[9, 255, 9]]])  # an id past K neither votes nor is filled
    assert torch.equal(fill_ignore_from_neighbours(stray, 3), stray)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        fill_ignore_from_neighbours(line[0], 3)
    # A token is ignored only when every pixel of its patch is ignore.
    labels = torch.full((1, 4, 8), 255)
    labels[0, 3, 7] = 1  # one valid pixel in the second patch
    assert token_ignore_mask(labels, 4).tolist() == [[[True, False]]]
    labels[0, 0, 0] = 0
    assert token_ignore_mask(labels, 4).tolist() == [[[False, False]]]


def test_make_targets_fill_and_token_ignore(ff):
    masks = torch.randint(0, K, (1, 8, 12))
    masks[0, :4, :4] = 255  # patch (0, 0) fully ignore -> token ignored
    masks[0, 4:8, 4] = 255  # patch (1, 1) partly ignore -> token kept, its ignore pixels filled
    aux = torch.full_like(masks, 3)
    labels, tokens = ff.make_targets(masks, aux)
    assert torch.equal(labels, masks)  # scale 1
    vocab = ff.tokenizer.vocab_size
    assert tokens.shape == (1, 2, 3)
    assert int(tokens[0, 0, 0]) == vocab and bool((tokens.flatten()[1:] < vocab).all())
    filled = torch.where(masks == 255, aux, masks)
    expected = ff.tokenizer.encode(masks_to_maskige(filled, ff.maskige_palette))
    assert torch.equal(tokens.flatten()[1:], expected.flatten()[1:])


def test_loss_terms_and_weights(ff):
    ff.train()
    try:
        batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, K, (2, 64, 64))}
        batch["mask"][:, :8] = 255
        out = ff.loss(batch)
    finally:
        ff.eval()
    assert set(out) >= {"loss", "loss_token", "loss_pixel"}
    torch.testing.assert_close(out["loss"].detach(), 0.8 * out["loss_token"] + 0.2 * out["loss_pixel"])
    # Rows 0..7 are ignore: two full token rows (patch 4) drop out of the token CE, which averages over all tokens.
    assert 0 < float(out["loss_token"]) < 1.2 * torch.log(torch.tensor(float(ff.tokenizer.vocab_size)))


# ---- inference --------------------------------------------------------------------------------------------------------


def test_forward_is_soft_vote_and_predict_matches_class_map(ff):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        votes = ff(x)
        stages = ff.stages(x)
    assert votes.shape == (2, K, 64, 64)
    torch.testing.assert_close(votes.sum(1), torch.ones(2, 64, 64))
    assert torch.equal(ff.predict(x), stages["class_map"])
    assert stages["tokens"].shape == (2, 16, 16) and stages["maskige"].shape == (2, 3, 64, 64)


def _near_ties(scores: torch.Tensor, dim: int, largest: bool, tol: float) -> torch.Tensor:
    """Where the best and second-best of ``scores`` along ``dim`` are within ``tol``: an argmax / argmin there
    depends on the accumulation order, so two correct implementations may pick either index."""
    top2 = scores.topk(2, dim=dim, largest=largest).values
    return (top2.narrow(dim, 0, 1) - top2.narrow(dim, 1, 1)).abs().squeeze(dim) <= tol


def _assert_same_choice(fused: torch.Tensor, ref: torch.Tensor, ties: torch.Tensor, what: str) -> None:
    differ = fused != ref
    assert not (differ & ~ties).any(), f"{what}: {int((differ & ~ties).sum())} choices differ away from a near-tie"


def _check_fused_stages(model, x: torch.Tensor) -> None:
    """Each fused stage against its reference on the SAME input (so that one near-tie cannot cascade): the token
    GEMM + argmax (fp32 sums in another order: ties within 1e-4 of the logit scale may go either way), the code
    gather (one-hot x weights adds exact zeros: identical) and the nearest palette colour (ties likewise)."""
    with torch.no_grad():
        _, feats = model.head_features(x)
        logits = model.head.token_logits(feats)
        tokens = model.token_ids(feats, fused=True)
        ties = _near_ties(logits, 1, largest=True, tol=1e-4 * float(logits.abs().max()))
        _assert_same_choice(tokens, model.token_ids(feats, fused=False), ties, "token ids")
        maskige = model.decode_maskige(tokens, fused=True)
        assert torch.equal(maskige, model.decode_maskige(tokens, fused=False))
        rgb = maskige * 255.0
        dist = ((rgb.permute(0, 2, 3, 1)[..., None, :] - model.maskige_palette[: model.num_classes]) ** 2).sum(-1)
        ties = _near_ties(dist, -1, largest=False, tol=1e-3 * float(dist.max()))
        classes = model.maskige_to_classes(maskige, fused=True)
        _assert_same_choice(classes, model.maskige_to_classes(maskige, fused=False), ties, "palette inverse")
        torch.testing.assert_close(model(x), model.vote(classes))  # forward is the fused pipeline


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_fused_and_reference_inference_agree(impl, request):
    device = request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")
    model = fastseg.create_model("gss_ff_resnet18", num_classes=K, impl=impl).eval().to(device)
    _check_fused_stages(model, torch.randn(1, 3, 32, 32, device=device))  # small: the Triton interpreter is slow


def test_palette_inverse_scale2_vote_matches_bilinear():
    # The official vote is a bilinear 2x downsample of the one-hot map; at ratio 2 that is the 2x2 box average.
    model = GSSSegmenter.__new__(GSSSegmenter)
    torch.nn.Module.__init__(model)
    model.maskige_scale = 2
    model.pretrained_cfg = fastseg.models._base.resolve_cfg(K)
    cls = torch.randint(0, 3, (2, 16, 20))
    cls[0, :2, :2] = torch.tensor([[0, 2], [2, 0]])  # a 2-2 tie: the lowest class id wins
    votes = model.vote(cls)
    onehot = F.one_hot(cls, K).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(votes, F.interpolate(onehot, scale_factor=0.5, mode="bilinear", align_corners=False))
    assert int(votes.argmax(1)[0, 0, 0]) == 0


def test_ftw_stage_freezing_and_load_prior(ff):
    torch.manual_seed(1)
    ftw = fastseg.create_model("gss_ftw_resnet18", num_classes=K)
    assert ftw.stage == "inverse"
    trainable = {n.split(".")[0] for n, p in ftw.named_parameters() if p.requires_grad}
    assert trainable == {"inverse"}
    ftw.train()
    assert not ftw.backbone.training and not ftw.head.training and not ftw.tokenizer.training
    ftw.load_prior(ff)
    for key, value in ff.state_dict().items():
        assert torch.equal(ftw.state_dict()[key], value), key
    ftw.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        st = ftw.stages(x)
        assert torch.equal(st["tokens"], ff.stages(x)["tokens"])
        assert torch.equal(ftw(x).argmax(1), st["output"].argmax(1))
    with pytest.raises(ValueError, match="variant='ftw'"):
        ff.set_stage("inverse")
    with pytest.raises(ValueError, match="lacks"):
        ftw.load_prior({})


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="downsampling by 8"):
        fastseg.create_model("gss_ff_resnet18", maskige_scale=2)
    with pytest.raises(ValueError, match="variant"):
        GSSSegmenter(variant="xx")
    tok = MaskigeVQVAE(vocab_size=16, code_dim=4, width=8)
    with pytest.raises(ValueError, match="multiple"):
        tok.encode(torch.rand(1, 3, 10, 12))
    with pytest.raises(ValueError, match="integer"):
        tok.embed(torch.zeros(1, 2, 2))


class _IdentityTokenizer(torch.nn.Module):
    def encode(self, maskige):
        return maskige

    def decode(self, ids):
        return ids


@pytest.mark.parametrize("scale", [1, 2])
def test_roundtrip_miou_of_a_lossless_tokenizer_is_one(scale):
    masks = torch.randint(0, K, (3, 16, 16))
    masks[:, :2] = 255
    pal = make_maskige_palette(K)
    res = roundtrip_miou(_IdentityTokenizer(), pal, [{"mask": m} for m in masks], K, maskige_scale=scale, batch_size=2)
    assert res["images"] == 3 and res["mIoU"] == pytest.approx(1.0)


class _RecordingTokenizer(_IdentityTokenizer):
    def __init__(self):
        super().__init__()
        self.seen = []

    def encode(self, maskige):
        self.seen.append(maskige)
        return maskige


def test_roundtrip_never_encodes_the_ignore_colour():
    # GSS fills ignore pixels before tokenising; its round trip must measure the maskiges GSS encodes.
    masks = torch.randint(0, K, (2, 16, 16))
    masks[:, 5:7] = 255
    pal = make_maskige_palette(K)
    tok = _RecordingTokenizer()
    roundtrip_miou(tok, pal, [{"mask": m} for m in masks], K)
    ignore_colour = (pal[K].float() / 255.0)[None, :, None, None]
    assert not (tok.seen[0] == ignore_colour).all(1).any()


def test_roundtrip_miou_of_the_model_tokenizer_is_recomputed(ff):
    masks = torch.randint(0, K, (3, 32, 32))
    masks[:, :3] = 255
    res = roundtrip_miou(ff.tokenizer, ff.maskige_palette, [{"mask": m} for m in masks], K, batch_size=2)
    assert res["images"] == 3
    # The same pipeline by hand: maskige -> tokens -> decoded maskige -> nearest palette colour (fp64 brute force),
    # then per-class IoU with boolean masks, ignore pixels excluded.
    pal = ff.maskige_palette.double()
    with torch.no_grad():
        filled = fill_ignore_from_neighbours(masks, K)
        rec = ff.tokenizer.decode(ff.tokenizer.encode(masks_to_maskige(filled, ff.maskige_palette))).double() * 255
    dist = ((rec.permute(0, 2, 3, 1)[..., None, :] - pal[:K]) ** 2).sum(-1)  # (B, H, W, K)
    nearest = dist.argmin(-1)
    top2 = dist.sort(-1).values[..., :2]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3  # no near-tie that fp32 rounding could flip
    keep = masks != 255
    ious = []
    for c in range(K):
        p, t = (nearest == c) & keep, (masks == c) & keep
        if (p | t).any():
            ious.append(float((p & t).sum() / (p | t).sum()))
    assert res["mIoU"] == pytest.approx(sum(ious) / len(ious), abs=1e-9)


# ---- the two tokenizer fits: images only (GSS's premise) and class-aware on masks (ours) ---------------------------


def _tiny_vqvae() -> MaskigeVQVAE:
    return MaskigeVQVAE(vocab_size=16, code_dim=4, width=8, downsample=4)


def _image_batches(masks_seed: int) -> list[dict[str, torch.Tensor]]:
    """Two dataset-like batches: normalised images (the same every call) and masks drawn from ``masks_seed``."""
    g = torch.Generator().manual_seed(SEED)
    images = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)]
    gm = torch.Generator().manual_seed(masks_seed)
    return [{"image": im, "mask": torch.randint(0, K, (2, 16, 16), generator=gm)} for im in images]


def _fit(kind: str, batches, steps: int = 4) -> MaskigeVQVAE:
    torch.manual_seed(SEED)  # the codebook initialisation draws from the global generator
    tok = _tiny_vqvae()
    if kind.startswith("images"):
        fit_image_tokenizer(tok, batches, steps=steps, colour_augment=kind == "images+augment")
    else:
        train_maskige_vqvae(tok, make_maskige_palette(K), [b["mask"] for b in batches], steps=steps)
    return tok


def test_image_tokenizer_fit_never_reads_labels():
    # GSS's premise: the tokenizer is fitted on images only. Corrupting every mask must not change a single bit of
    # the fitted weights (the same computation run twice), while the fit does move the weights away from the init.
    clean = _fit("images", _image_batches(masks_seed=1))
    corrupt = _image_batches(masks_seed=2)
    for b in corrupt:
        b["mask"] = torch.full_like(b["mask"], 255) if b is corrupt[0] else b["mask"].flip(-1)
    again = _fit("images", corrupt)
    torch.manual_seed(SEED)
    init = _tiny_vqvae().state_dict()
    for key, value in clean.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(clean.state_dict()["enc.0.weight"], init["enc.0.weight"])
    assert not any(p.requires_grad for p in clean.parameters()) and not clean.training  # left frozen
    # A fit without any "mask" key at all, and one on [0, 1] tensors, are the same fit.
    no_masks = _fit("images", [{"image": b["image"]} for b in _image_batches(masks_seed=1)])
    assert torch.equal(no_masks.state_dict()["dec.0.weight"], clean.state_dict()["dec.0.weight"])
    from fastseg.data.shapes import unnormalize

    tensors = _fit("images", [unnormalize(b["image"]) for b in _image_batches(masks_seed=1)])
    assert torch.equal(tensors.state_dict()["dec.0.weight"], clean.state_dict()["dec.0.weight"])
    # The label-free colour augmentation keeps that property, and does change the fit.
    aug_clean = _fit("images+augment", _image_batches(masks_seed=1))
    aug_corrupt = _fit("images+augment", corrupt)
    for key, value in aug_clean.state_dict().items():
        assert torch.equal(value, aug_corrupt.state_dict()[key]), key
    assert not torch.equal(aug_clean.state_dict()["enc.0.weight"], clean.state_dict()["enc.0.weight"])
    # The control: the class-aware fit (ours) does read the masks, so the same corruption changes its weights.
    ours_clean = _fit("masks", _image_batches(masks_seed=1))
    ours_corrupt = _fit("masks", _image_batches(masks_seed=2))
    assert not torch.equal(ours_clean.state_dict()["enc.0.weight"], ours_corrupt.state_dict()["enc.0.weight"])


def test_image_tokenizer_fit_rejects_bad_batches():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_image_tokenizer(_tiny_vqvae(), [torch.randn(2, 3, 16, 16) * 3], steps=1)
    with pytest.raises(ValueError, match="'image'"):
        fit_image_tokenizer(_tiny_vqvae(), [{"mask": torch.zeros(2, 16, 16)}], steps=1)
    with pytest.raises(ValueError, match="steps"):
        fit_image_tokenizer(_tiny_vqvae(), [torch.rand(2, 3, 16, 16)], steps=0)


@pytest.mark.parametrize("kind", ["images", "masks"])
def test_roundtrip_runs_with_both_tokenizers(kind):
    tok = _fit(kind, _image_batches(masks_seed=1), steps=3)
    masks = torch.randint(0, K, (3, 16, 16))
    masks[:, :2] = 255
    pal = make_maskige_palette(K)
    res = roundtrip_miou(tok, pal, [{"mask": m} for m in masks], K, batch_size=2)
    assert res["images"] == 3 and 0.0 <= res["mIoU"] <= 1.0
    # The metric is that of the tokenizer's own reconstruction: recompute the class map by hand.
    with torch.no_grad():
        rec = tok.decode(tok.encode(masks_to_maskige(masks, pal))) * 255
    nearest = palette_inverse_ref(rec, pal[:K])
    dist = ((rec.permute(0, 2, 3, 1)[..., None, :] - pal[:K]) ** 2).sum(-1).sort(-1).values
    assert (dist[..., 1] - dist[..., 0]).min() > 1e-2  # no near-tie that another summation order could flip
    keep = masks != 255
    assert res["aAcc"] == pytest.approx(float((nearest == masks)[keep].float().mean()), abs=1e-6)


def test_export_with_decompositions(ff):
    from fastseg.kernels import DECOMPOSITIONS

    x = torch.randn(1, 3, 64, 64)
    ep = torch.export.export(ff.eval(), (x,)).run_decompositions(DECOMPOSITIONS)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("fastseg" in t for t in targets), "custom ops must be decomposed"
    assert not any("one_hot" in t for t in targets)
    assert any("embedding" in t for t in targets)  # the code gather
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), ff(x))


# ---- DALL-E dVAE -------------------------------------------------------------------------------------------------------


def _dalle_pickles(tmp_path):
    dall_e = pytest.importorskip("dall_e", reason="the dall-e package is needed for the parity test")
    torch.manual_seed(SEED)
    enc = dall_e.Encoder(n_hid=64, vocab_size=512, device=torch.device("cpu"))
    dec = dall_e.Decoder(n_hid=64, vocab_size=512, device=torch.device("cpu"))
    for p in list(enc.parameters()) + list(dec.parameters()):  # non-zero biases: a stronger check
        if p.dim() == 1:
            p.data.normal_(std=0.1)
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    return enc, dec


def test_dalle_parity_with_official_package(tmp_path):
    enc, dec = _dalle_pickles(tmp_path)
    ours = DalleDVAE(n_hid=64, vocab_size=512)
    f_enc = convert_dalle_pickle(
        tmp_path / "encoder.pkl", tmp_path / "enc.safetensors", trust_pickle=True, prefix="encoder."
    )
    f_dec = convert_dalle_pickle(
        tmp_path / "decoder.pkl", tmp_path / "dec.safetensors", trust_pickle=True, prefix="decoder."
    )
    from safetensors.torch import load_file

    state = {**load_file(f_enc), **load_file(f_dec)}
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state)
    from dall_e import map_pixels as their_map
    from dall_e import unmap_pixels as their_unmap

    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(map_pixels(x), their_map(x))
    with torch.no_grad():
        logits = enc(their_map(x))
        torch.testing.assert_close(ours.encoder(map_pixels(x)), logits, rtol=1e-5, atol=1e-5)
        ids = ours.encode(x)
        assert ids.shape == (2, 4, 4)
        ties = _near_ties(logits, 1, largest=True, tol=1e-5 * float(logits.abs().max()))  # two implementations
        _assert_same_choice(ids, logits.argmax(1), ties, "DALL-E code ids")
        ids = logits.argmax(1)  # decode the official ids: the decoder comparison below does not hinge on a tie
        onehot = F.one_hot(ids, 512).permute(0, 3, 1, 2).float()
        theirs = their_unmap(torch.sigmoid(dec(onehot)[:, :3].float()))
        torch.testing.assert_close(ours.decode(ids), theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unmap_pixels(torch.sigmoid(ours.decoder(onehot)[:, :3])), theirs)
        assert torch.equal(ours.embed(ids), ours.embed_dense(ids))  # code gather == one-hot + 1x1 conv


def test_converter_refuses_untrusted_pickles(tmp_path):
    _dalle_pickles(tmp_path)
    with pytest.raises(ValueError, match="trust_pickle"):
        convert_dalle_pickle(tmp_path / "encoder.pkl", tmp_path / "enc.safetensors")
    assert not (tmp_path / "enc.safetensors").exists()

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"blocks.input.w": Evil()}))
    with pytest.raises(ValueError, match="trust_pickle"):
        convert_dalle_pickle(tmp_path / "evil.pkl", tmp_path / "evil.safetensors")
    assert not marker.exists(), "the pickle's payload ran"
    # Plain tensors need no trust; the source is never overwritten; a missing file is named.
    torch.save({"blocks.input.w": torch.ones(2)}, tmp_path / "plain.pt")
    out = convert_dalle_pickle(tmp_path / "plain.pt", tmp_path / "plain.safetensors")
    assert out.exists()
    with pytest.raises(ValueError, match="overwrite"):
        convert_dalle_pickle(tmp_path / "plain.pt", tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        convert_dalle_pickle(tmp_path / "nope.pkl", tmp_path / "x.safetensors")


def test_dalle_tokenizer_in_gss_geometry():
    # Paper geometry at test size: tokens at 1/4, maskige at 2x the input, 8x decoder.
    torch.manual_seed(SEED)
    head = {"channels": 16, "fused": 32, "depth": 2, "heads": 4, "window": 7, "hidden": 32, "pixel_channels": 16}
    model = GSSSegmenter(
        "resnet18",
        num_classes=5,
        tokenizer="dalle",
        maskige_scale=2,
        head_kwargs=head,
        tokenizer_kwargs={"n_hid": 64, "vocab_size": 512, "n_init": 32},
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        st = model.stages(x)
        assert st["tokens"].shape == (1, 8, 8) and st["maskige"].shape == (1, 3, 64, 64)
        assert model(x).shape == (1, 5, 32, 32)
    _check_fused_stages(model, x)
    model.train()
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 5, (2, 32, 32))}  # BN: batch > 1
    out = model.loss(batch)
    assert torch.isfinite(out["loss"])


def test_cli_commands(tmp_path, capsys):
    import argparse

    from fastseg.cli.gss import add_gss_commands

    parser = argparse.ArgumentParser()
    add_gss_commands(parser.add_subparsers(dest="command"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "m.pkl")
    args = parser.parse_args(["gss", "convert-dalle", str(tmp_path / "m.pkl"), str(tmp_path / "o.safetensors")])
    with pytest.raises(ValueError, match="trust_pickle"):
        args.func(args)
    args = parser.parse_args(
        ["gss", "roundtrip", "gss_ff_resnet18", "--length", "2", "--json", str(tmp_path / "r.json")]
    )
    assert args.func(args) == 0
    assert "round trip (" in capsys.readouterr().out and (tmp_path / "r.json").exists()
    args = parser.parse_args(["gss", "roundtrip", "fpn_resnet18", "--length", "2"])
    with pytest.raises(ValueError, match="not a GSS model"):
        args.func(args)


@pytest.mark.parametrize("on", ["images", "masks"])
def test_cli_fit_tokenizer_records_what_it_was_fitted_on(on, tmp_path, capsys):
    import argparse
    import json

    from fastseg.checkpoint import read_metadata
    from fastseg.cli.gss import add_gss_commands

    parser = argparse.ArgumentParser()
    add_gss_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / f"tok_{on}.safetensors"
    args = parser.parse_args(
        [
            "gss",
            "fit-tokenizer",
            "gss_ff_resnet18",
            "--on",
            on,
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--length",
            "2",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert args.func(args) == 0
    assert read_metadata(out)[TOKENIZER_TRAINED_ON] == on
    assert json.loads((tmp_path / "r.json").read_text())["tokenizer_trained_on"] == on
    assert f"tokenizer fitted on {on}" in capsys.readouterr().out
    model = fastseg.create_model("gss_ff_resnet18", tokenizer_checkpoint=str(out))
    assert model.tokenizer_trained_on == on
    assert fastseg.create_model("gss_ff_resnet18").tokenizer_trained_on is None
    with pytest.raises(ValueError, match="exists"):
        args.func(args)
    assert parser.parse_args(["gss", "fit-tokenizer", "gss_ff_resnet18", "--out", "x"]).on == "images"  # the default
    args = parser.parse_args(
        [
            "gss",
            "fit-tokenizer",
            "gss_ff_resnet18",
            "--on",
            "masks",
            "--colour-augment",
            "--out",
            str(tmp_path / "never.safetensors"),
        ]
    )
    with pytest.raises(ValueError, match="--on images only"):
        args.func(args)
    assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.gpu
def test_dalle_mixed_precision_matches_official_on_cuda(tmp_path):
    # The official conv wrapper runs fp16 on CUDA except the decoder's input and the encoder's output convs.
    enc, dec = _dalle_pickles(tmp_path)
    ours = DalleDVAE(n_hid=64, vocab_size=512)
    ours.encoder.load_state_dict(enc.state_dict())
    ours.decoder.load_state_dict(dec.state_dict())
    enc, dec, ours = enc.cuda(), dec.cuda(), ours.cuda()
    from dall_e import map_pixels as their_map
    from dall_e import unmap_pixels as their_unmap

    x = torch.rand(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        logits = enc(their_map(x)).float()
        torch.testing.assert_close(ours.encoder(map_pixels(x)), logits, rtol=2e-3, atol=2e-3)
        ids = logits.argmax(1)
        onehot = F.one_hot(ids, 512).permute(0, 3, 1, 2).float()
        theirs = their_unmap(torch.sigmoid(dec(onehot)[:, :3].float()))
        torch.testing.assert_close(ours.decode(ids), theirs, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_fused_and_reference_inference_agree_on_cuda():
    model = fastseg.create_model("gss_ff_resnet18", num_classes=K, impl="triton").cuda().eval()
    _check_fused_stages(model, torch.randn(2, 3, 128, 128, device="cuda"))
