"""GSS: Generative Semantic Segmentation (Chen et al., CVPR 2023), on fastseg's fused VQ kernels.

A mask is rendered as an RGB image, the *maskige* (X: class -> palette colour); an image tokenizer turns maskiges
into discrete tokens; a conditioning network (backbone + GSS head) predicts the tokens of an image's maskige
(the latent prior p(z | I), trained by cross-entropy against the tokenizer's tokens); inference decodes the
predicted tokens to a maskige and inverts X.

Stages (each a documented call; DESIGN.md's multi-stage contract):

1. Posterior of X (no training): `make_maskige_palette` (the paper's jittered-RGB-grid rule, greys avoided,
   `palette_min_distance` reported). The tokenizer is frozen: the DALL-E dVAE architecture (`DalleDVAE`, spec
   A.3.1; OpenAI's DALL-E ``encoder.pkl`` / ``decoder.pkl`` weights convert with `convert_dalle_pickle` -- these
   are the tokenizer's weights, not GSS checkpoints, for which fastseg has no converter) or, on this machine, a
   small VQ-VAE (`MaskigeVQVAE`) fitted once, either on **images only**
   (`fastseg.engine.recipes.gss.fit_image_tokenizer`: GSS's premise, a tokenizer never trained on masks) or on
   maskiges with a class-aware palette term (`fastseg.engine.recipes.gss.train_maskige_vqvae`: ours, not the
   paper's); ``tokenizer_trained_on`` says which, when the weights file records it.
   `fastseg.engine.recipes.gss.roundtrip_miou` measures the tokenizer's round trip (GT -> maskige -> tokens ->
   maskige -> classes).
2. Latent prior (GSS-FF): ``model.loss(batch)`` with ``model.stage == "prior"``: 0.8 x token CE + 0.2 x auxiliary
   pixel CE, ignore pixels filled by the auxiliary prediction, tokens ignored only when their whole patch is ignore
   (spec A.4; `upsample_labels`, `fill_ignore`, `token_ignore_mask`, `GSSSegmenter.make_targets`).
3. Posterior of X^-1 (GSS-FT-W): ``model.set_stage("inverse")`` (FT-W models start there) freezes backbone and prior
   head; ``model.loss`` then trains the windowed-attention inverse on decoded maskiges. ``model.load_prior(...)``
   copies the weights of a trained GSS-FF model.

Inference (``model.stages(images)`` exposes every step): backbone -> head features -> token argmax
(`ArgmaxTokenHead`, the fused GEMM + argmax: the vocab x h x w logits are never written) -> code gather (the
decoder's first layer as an embedding lookup, not one-hot + dense conv) -> decoder -> maskige in [0, 1] ->
X^-1: nearest palette colour (`PaletteInverse`, `vq_nearest`) for FF, or the FT-W network. The reference path
(``fused=False``) runs the dense logits, one-hot + 1x1 conv and a broadcast palette argmin.

What ``model(images)`` returns (the "logits" of the contract), at the input resolution (``output_stride = 1``):

* GSS-FF: the **soft votes** of the official segmentor: one-hot of the class map at the maskige resolution
  (``maskige_scale`` x input), averaged over each input pixel's ``maskige_scale x maskige_scale`` footprint (the
  2x bilinear downsample of the official code is exactly this box average). Values in [0, 1], summing to 1 over
  classes; their argmax (ties -> lowest class id, as torch.argmax) is the prediction. Not differentiable.
* GSS-FT-W: the FT-W logits, box-averaged from the maskige resolution to the input resolution.

Geometry: tokens at 1/4 of the input; the DALL-E tokenizer downsamples by 8, so its maskige is at 2x the input
(``maskige_scale=2``); the small VQ-VAE downsamples by 4 with maskiges at the input resolution (``maskige_scale=1``).

`TOKENIZER_TRAINED_ON` is the safetensors metadata key of a tokenizer weights file saying what it was fitted on
(``"images"``: `fit_image_tokenizer`; ``"masks"``: `train_maskige_vqvae`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.blocks import ConvNormAct
from ..layers.swin import SwinStack
from ..layers.vq import ArgmaxTokenHead, PaletteInverse
from ..registry import register_model
from ._base import SegmentationModel, pad_to_multiple, resize, resolve_cfg
from .backbones import create_backbone
from .gss_tokenizers import (
    DalleDVAE,
    MaskigeTokenizer,
    MaskigeVQVAE,
    convert_dalle_pickle,
)

__all__ = [
    "TOKENIZER_TRAINED_ON",
    "DalleDVAE",
    "GSSInverseHead",
    "GSSPriorHead",
    "GSSSegmenter",
    "MaskigeTokenizer",
    "MaskigeVQVAE",
    "convert_dalle_pickle",
    "fill_ignore",
    "fill_ignore_from_neighbours",
    "make_maskige_palette",
    "masks_to_maskige",
    "palette_inverse_ref",
    "palette_min_distance",
    "token_ignore_mask",
    "upsample_labels",
]


# --------------------------------------------------------------------------------------------------------------------
# Maskige: X and X^-1
# --------------------------------------------------------------------------------------------------------------------

TOKENIZER_TRAINED_ON = "gss_tokenizer_trained_on"  # metadata key: "images" (GSS's premise) or "masks" (ours)


def make_maskige_palette(
    num_classes: int, seed: int = 0, jitter: int = 15, min_chroma: int = 48, low: int = 16, high: int = 240
) -> torch.Tensor:
    """Class colours for maskiges by the GSS rule: a regular RGB grid plus integer jitter, greys avoided.

    The grid has ``n`` levels per channel between ``low`` and ``high`` (the smallest ``n`` leaving enough colours);
    points whose chroma ``max(rgb) - min(rgb)`` is below ``min_chroma`` (the grey diagonal, which the GSS README
    reports to reconstruct badly) are dropped; ``num_classes + 1`` points are then picked by farthest-point sampling
    (so colours spread over the cube rather than filling one corner), each is jittered by a uniform integer in
    ``[-jitter, jitter]`` per channel (seeded) and clamped to 0..255. Row ``num_classes`` is the ignore colour
    (X maps ignore there; X^-1 never returns it).

    Returns:
        float32 (num_classes + 1, 3) colours in 0..255 (integer-valued).
    """
    if num_classes < 1:
        raise ValueError(f"make_maskige_palette: num_classes must be >= 1, got {num_classes}")
    if not 0 <= low < high <= 255 or jitter < 0:
        raise ValueError(
            f"make_maskige_palette: need 0 <= low < high <= 255 and jitter >= 0, got {low}, {high}, {jitter}"
        )
    need = num_classes + 1
    for n in range(2, 65):
        if (high - low) / (n - 1) <= 2 * jitter:  # the jitter would let neighbouring grid colours meet
            raise ValueError(
                f"make_maskige_palette: cannot place {need} colours {2 * jitter} apart in RGB; lower jitter "
                f"({jitter}) or min_chroma ({min_chroma})"
            )
        levels = torch.linspace(low, high, n)
        grid = torch.cartesian_prod(levels, levels, levels)
        chroma = grid.max(1).values - grid.min(1).values
        grid = grid[chroma >= min_chroma]
        if grid.shape[0] >= need:
            break
    else:
        raise ValueError(f"make_maskige_palette: cannot place {need} colours with min_chroma={min_chroma}")
    # Farthest-point sampling from the most saturated colour: deterministic and well spread.
    chosen = [int((grid.max(1).values - grid.min(1).values).argmax())]
    dist = ((grid - grid[chosen[0]]) ** 2).sum(1)
    while len(chosen) < need:
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, ((grid - grid[nxt]) ** 2).sum(1))
    palette = grid[chosen]
    g = torch.Generator().manual_seed(seed)
    palette = palette + torch.randint(-jitter, jitter + 1, palette.shape, generator=g).float()
    return palette.round().clamp(0, 255)


def palette_min_distance(palette: torch.Tensor) -> float:
    """Smallest pairwise L2 distance between the rows of a (K, 3) palette (the GSS quality bound; want >~ 20)."""
    palette = torch.as_tensor(palette, dtype=torch.float32)
    if palette.shape[0] < 2:
        return float("inf")
    d = torch.cdist(palette, palette)
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def masks_to_maskige(masks: torch.Tensor, palette: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """X: (B, H, W) class ids -> (B, 3, H, W) maskige in [0, 1] (``palette / 255``).

    ``palette`` has K + 1 rows; ``ignore_index`` (and any id > K) maps to row K, the ignore colour.
    """
    k = palette.shape[0] - 1
    ids = torch.where(masks == ignore_index, torch.full_like(masks, k), masks).clamp(0, k).long()
    return (F.embedding(ids, palette.to(torch.float32)) / 255.0).permute(0, 3, 1, 2)


def palette_inverse_ref(rgb255: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """X^-1 reference: (B, 3, H, W) RGB in 0..255 -> argmin_k squared L2 to the K class colours, broadcast."""
    d = ((rgb255.float()[:, None] - palette.float()[None, :, :, None, None]) ** 2).sum(2)
    return d.argmin(1)


def upsample_labels(masks: torch.Tensor, scale: int, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """GT to the maskige resolution the GSS way: one-hot over K + 1 (ignore -> K), bilinear, argmax, K -> ignore.

    A smooth "nearest": at scale 1 it is the identity.
    """
    if scale == 1:
        return masks
    ids = torch.where(masks == ignore_index, torch.full_like(masks, num_classes), masks).long()
    onehot = F.one_hot(ids, num_classes + 1).permute(0, 3, 1, 2).float()
    up = F.interpolate(onehot, scale_factor=scale, mode="bilinear", align_corners=False).argmax(1)
    return torch.where(up == num_classes, torch.full_like(up, ignore_index), up)


def fill_ignore(labels: torch.Tensor, fill: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Ignore pixels take the auxiliary prediction ``fill`` (same shape), so the maskige has no ignore colour."""
    if fill.shape != labels.shape:
        raise ValueError(f"fill_ignore: fill shape {tuple(fill.shape)} != labels shape {tuple(labels.shape)}")
    return torch.where(labels == ignore_index, fill.to(labels.dtype), labels)


def fill_ignore_from_neighbours(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Ignore pixels take the most common class among their labelled 3 x 3 neighbours, repeated until every ignore
    pixel that touches a labelled region is filled (ties -> lowest class id).

    GSS never renders the ignore colour: training fills ignore pixels with the auxiliary head's prediction
    (`fill_ignore`). Where no predictor exists (the tokenizer's round trip, the class-aware tokenizer fit) the
    label map's own neighbours stand in for it, so the tokenizer is measured on the maskiges GSS actually encodes.
    An image with no labelled pixel stays ignore (its pixels count nowhere); ids outside 0..K-1 other than
    ``ignore_index`` neither vote nor get filled (`masks_to_maskige` renders them in the ignore colour).
    """
    if labels.dim() != 3:
        raise ValueError(f"fill_ignore_from_neighbours: labels must be (B, H, W), got {tuple(labels.shape)}")
    filled = labels.clone()
    while True:
        missing = filled == ignore_index
        if not bool(missing.any()):
            return filled
        voter = (filled >= 0) & (filled < num_classes)
        # One-hot over K + 1 channels (the last for non-voters), as float: votes are box sums of it.
        votes = torch.zeros((filled.shape[0], num_classes + 1, *filled.shape[1:]), device=filled.device)
        votes.scatter_(1, torch.where(voter, filled, num_classes).long()[:, None], 1.0)
        votes = F.avg_pool2d(votes[:, :num_classes], 3, 1, 1)
        reachable = missing & (votes.amax(1) > 0)
        if not bool(reachable.any()):
            return filled
        filled = torch.where(reachable, votes.argmax(1).to(filled.dtype), filled)


def token_ignore_mask(labels: torch.Tensor, patch: int, ignore_index: int = 255) -> torch.Tensor:
    """(B, H, W) labels -> (B, H/patch, W/patch) bool: True where **every** pixel of the token's patch is ignore."""
    valid = (labels != ignore_index).float()[:, None]
    return F.max_pool2d(valid, patch, patch)[:, 0] == 0


def _ce_over_all(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """mmseg 0.x cross-entropy (``avg_non_ignore=False``): the mean over all positions, ignored ones count 0."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / max(1, target.numel())


# --------------------------------------------------------------------------------------------------------------------
# The heads
# --------------------------------------------------------------------------------------------------------------------


class GSSPriorHead(nn.Module):
    """The GSS-FF head (spec A.2, steps 3-8): the latent prior p(z | I) over the tokenizer's vocabulary.

    Token branch: per level 1x1 conv -> ``channels`` (BN, ReLU), bilinear to the 1/4 map, concat in ``in_index``
    order, 1x1 -> ``fused``, Swin blocks + LN, 1x1 -> ``hidden`` (BN, ReLU), Dropout2d, 1x1 -> vocab (the
    `ArgmaxTokenHead`). Auxiliary pixel branch (training only): separate 1x1 convs -> ``pixel_channels``, fusion
    1x1, 1x1 -> K class logits.
    """

    def __init__(
        self,
        in_channels: list[int],
        vocab_size: int,
        num_classes: int,
        channels: int = 384,
        fused: int = 512,
        depth: int = 2,
        heads: int = 16,
        window: int = 7,
        mlp_ratio: float = 2.0,
        hidden: int = 2048,
        pixel_channels: int = 384,
        dropout: float = 0.1,
        in_index: tuple[int, ...] = (1, 0, 2, 3),
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if sorted(in_index) != list(range(len(in_channels))):
            raise ValueError(f"GSSPriorHead: in_index {in_index} is not a permutation of the {len(in_channels)} levels")
        self.in_index = tuple(in_index)
        chans = [in_channels[i] for i in self.in_index]
        self.convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm="bn") for c in chans)
        self.fusion_conv = ConvNormAct(channels * len(chans), fused, 1, norm="bn")
        self.transformer = SwinStack(fused, depth, heads, window, mlp_ratio)
        self.conv_before_seg = ConvNormAct(fused, hidden, 1, norm="bn")
        self.dropout = nn.Dropout2d(dropout)
        self.token_head = ArgmaxTokenHead(hidden, vocab_size, impl=impl)
        self.convs_pixel = nn.ModuleList(ConvNormAct(c, pixel_channels, 1, norm="bn") for c in chans)
        self.fusion_conv_pixel = ConvNormAct(pixel_channels * len(chans), pixel_channels, 1, norm="bn")
        self.conv_seg_pixel = nn.Conv2d(pixel_channels, num_classes, 1)

    def _gather(self, feats: list[torch.Tensor], convs: nn.ModuleList) -> torch.Tensor:
        inputs = [feats[i] for i in self.in_index]
        size = feats[0].shape[-2:]  # the finest (1/4) map
        outs = []
        for conv, x in zip(convs, inputs):
            y = conv(x)
            if y.shape[-2:] != size:
                y = resize(y, size)
            outs.append(y)
        return torch.cat(outs, 1)

    def features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Backbone levels -> (B, hidden, h, w) features feeding the token classifier."""
        x = self.transformer(self.fusion_conv(self._gather(feats, self.convs)))
        return self.dropout(self.conv_before_seg(x))

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (B, vocab, h, w) logits (training and the reference path)."""
        return self.token_head.conv(x)

    def token_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Fused: ``argmax_matmul``, logits never written."""
        return self.token_head.predict(x)

    def pixel_logits(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Auxiliary (B, K, h, w) class logits at 1/4."""
        return self.conv_seg_pixel(self.fusion_conv_pixel(self._gather(feats, self.convs_pixel)))


class GSSInverseHead(nn.Module):
    """GSS-FT-W's learned X^-1 (spec A.3.2): maskige in [0, 1] -> 1x1 conv (BN, ReLU) -> Swin blocks -> LN -> 1x1
    conv -> K logits at the maskige resolution."""

    def __init__(
        self,
        num_classes: int,
        channels: int = 128,
        depth: int = 2,
        heads: int = 4,
        window: int = 7,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.projection = ConvNormAct(3, channels, 1, norm="bn")
        self.transformer = SwinStack(channels, depth, heads, window, mlp_ratio)
        self.cls_segmap = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maskige: torch.Tensor) -> torch.Tensor:
        return self.cls_segmap(self.transformer(self.projection(maskige)))


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


class GSSSegmenter(SegmentationModel):
    """GSS-FF / GSS-FT-W: backbone + GSS prior head + frozen maskige tokenizer (+ learned inverse for FT-W).

    Args:
        backbone: fastseg backbone name.
        num_classes: K (default: the shapes world's).
        variant: ``"ff"`` (training-free X^-1) or ``"ftw"`` (learned X^-1; the model starts in the ``"inverse"``
            stage with backbone and prior head frozen).
        tokenizer: ``"vqvae"`` (small `MaskigeVQVAE`), ``"dalle"`` (`DalleDVAE`) or a `MaskigeTokenizer` instance.
        tokenizer_kwargs: constructor options of the named tokenizer.
        tokenizer_checkpoint: local safetensors file with the tokenizer's weights (keys of the tokenizer module).
            Its `TOKENIZER_TRAINED_ON` metadata (written by ``fastseg gss fit-tokenizer``) becomes
            ``model.tokenizer_trained_on``: ``"images"`` (the faithful, image-only fit), ``"masks"`` (ours,
            class-aware) or ``"unknown"``; ``None`` without a checkpoint.
        maskige_scale: maskige resolution / input resolution; the tokenizer must downsample by ``4 * maskige_scale``.
        head_kwargs: `GSSPriorHead` options (channels, fused, depth, heads, window, hidden, pixel_channels, ...).
        inverse_kwargs: `GSSInverseHead` options (FT-W only).
        token_weight, pixel_weight: loss weights (0.8 / 0.2 in the paper).
        palette_seed: seed of the maskige palette's jitter.
        impl: kernel implementation of the fused ops, ``"auto" | "triton" | "torch"``.
        backbone_checkpoint: local weights file for the backbone.
    """

    has_fused_ops = True

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        variant: str = "ff",
        tokenizer: str | MaskigeTokenizer = "vqvae",
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        tokenizer_checkpoint: str | os.PathLike | None = None,
        maskige_scale: int = 1,
        head_kwargs: Mapping[str, Any] | None = None,
        inverse_kwargs: Mapping[str, Any] | None = None,
        token_weight: float = 0.8,
        pixel_weight: float = 0.2,
        palette_seed: int = 0,
        impl: str = "auto",
        backbone_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if variant not in ("ff", "ftw"):
            raise ValueError(f"GSS variant must be 'ff' or 'ftw', got {variant!r}")
        if maskige_scale < 1:
            raise ValueError(f"maskige_scale must be a positive integer, got {maskige_scale}")
        self.variant, self.maskige_scale, self.impl = variant, int(maskige_scale), impl
        self.token_weight, self.pixel_weight = token_weight, pixel_weight
        self.backbone = create_backbone(backbone, checkpoint=backbone_checkpoint)
        if self.backbone.reductions[0] != 4:
            raise ValueError(
                f"GSS needs a stride-4 first backbone level (tokens at 1/4), got {self.backbone.reductions}"
            )
        self.pretrained_cfg = resolve_cfg(num_classes, output_stride=1, divisible_by=self.backbone.divisible_by)
        k = self.num_classes
        if isinstance(tokenizer, MaskigeTokenizer):
            self.tokenizer = tokenizer
        elif tokenizer == "vqvae":
            self.tokenizer = MaskigeVQVAE(**dict(tokenizer_kwargs or {}))
        elif tokenizer == "dalle":
            self.tokenizer = DalleDVAE(**dict(tokenizer_kwargs or {}))
        else:
            raise ValueError(f"tokenizer must be 'vqvae', 'dalle' or a MaskigeTokenizer, got {tokenizer!r}")
        if self.tokenizer.downsample != 4 * self.maskige_scale:
            raise ValueError(
                f"tokens sit at 1/4 of the input, so a maskige at {self.maskige_scale}x the input needs a tokenizer "
                f"downsampling by {4 * self.maskige_scale}; this one downsamples by {self.tokenizer.downsample}"
            )
        self.tokenizer_trained_on: str | None = None
        if tokenizer_checkpoint is not None:
            from ..checkpoint import load_weights, read_metadata

            load_weights(self.tokenizer, tokenizer_checkpoint)
            self.tokenizer_trained_on = read_metadata(tokenizer_checkpoint).get(TOKENIZER_TRAINED_ON, "unknown")
        self.tokenizer.requires_grad_(False)
        self.head = GSSPriorHead(
            list(self.backbone.channels), self.tokenizer.vocab_size, k, impl=impl, **dict(head_kwargs or {})
        )
        self.register_buffer("maskige_palette", make_maskige_palette(k, seed=palette_seed))
        self.palette_inverse = PaletteInverse(self.maskige_palette[:k].clone(), impl=impl)
        self.inverse = GSSInverseHead(k, **dict(inverse_kwargs or {})) if variant == "ftw" else None
        self.stage = "prior"
        self.set_stage("inverse" if variant == "ftw" else "prior")

    # ---- stages -----------------------------------------------------------------------------------------------------

    def set_stage(self, stage: str) -> None:
        """``"prior"``: train backbone + prior head (GSS-FF). ``"inverse"``: FT-W only; freeze all but the inverse."""
        if stage not in ("prior", "inverse"):
            raise ValueError(f"stage must be 'prior' or 'inverse', got {stage!r}")
        if stage == "inverse" and self.inverse is None:
            raise ValueError("the 'inverse' stage needs a GSS-FT-W model (variant='ftw')")
        self.stage = stage
        prior = stage == "prior"
        self.backbone.requires_grad_(prior)
        self.head.requires_grad_(prior)
        if self.inverse is not None:
            self.inverse.requires_grad_(not prior)
        self.train(self.training)

    def train(self, mode: bool = True) -> GSSSegmenter:
        super().train(mode)
        self.tokenizer.eval()  # frozen posterior: never update its statistics
        if self.stage == "inverse":  # frozen prior: BN statistics stay fixed while the inverse trains
            self.backbone.eval()
            self.head.eval()
        return self

    def load_prior(self, source: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy backbone, prior head, tokenizer and palette weights from a trained GSS-FF model (or its state dict)."""
        state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
        own = self.state_dict()
        wanted = [key for key in own if not key.startswith("inverse.")]
        missing = [key for key in wanted if key not in state]
        if missing:
            raise ValueError(f"load_prior: the source lacks {len(missing)} keys, e.g. {missing[:3]}")
        bad = [key for key in wanted if state[key].shape != own[key].shape]
        if bad:
            raise ValueError(f"load_prior: shape mismatch for {bad[:3]}")
        self.load_state_dict({key: state[key] for key in wanted}, strict=False)

    # ---- inference steps --------------------------------------------------------------------------------------------

    def head_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = self.backbone(images)
        return feats, self.head.features(feats)

    def token_ids(self, features: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """Head features -> (B, h, w) token ids: fused GEMM + argmax, or dense logits + argmax (reference)."""
        if fused:
            return self.head.token_ids(features)
        return self.head.token_logits(features).argmax(1)

    def decode_maskige(self, ids: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """Token ids -> maskige in [0, 1] at ``maskige_scale`` x input (code gather, or one-hot + 1x1 conv)."""
        codes = self.tokenizer.embed(ids) if fused else self.tokenizer.embed_dense(ids)
        return self.tokenizer.decode_codes(codes)

    def maskige_to_classes(self, maskige: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """X^-1 of GSS-FF: nearest of the K class colours in RGB 0..255 (`vq_nearest`, or the broadcast argmin)."""
        rgb = maskige * 255.0
        if fused:
            return self.palette_inverse(rgb)
        return palette_inverse_ref(rgb, self.maskige_palette[: self.num_classes])

    def vote(self, class_map: torch.Tensor) -> torch.Tensor:
        """(B, sH, sW) class ids -> (B, K, H, W) soft votes (one-hot box-averaged over s x s; Equal, not OneHot)."""
        classes = torch.arange(self.num_classes, device=class_map.device)
        onehot = (class_map[:, None] == classes[None, :, None, None]).float()
        s = self.maskige_scale
        return F.avg_pool2d(onehot, s, s) if s > 1 else onehot

    def benchmark_stages(self, fused: bool = True) -> list[tuple[str, Callable[[Any], Any]]]:
        """The GSS-FF inference pipeline as named steps, each fed the previous step's output (for
        ``fastseg bench --stages``): backbone, head, token argmax, decoder, palette inverse."""
        return [
            ("backbone", self.backbone),
            ("head", self.head.features),
            ("token_argmax", lambda features: self.token_ids(features, fused)),
            ("decoder", lambda ids: self.decode_maskige(ids, fused)),
            ("palette_inverse", lambda maskige: self.maskige_to_classes(maskige, fused)),
        ]

    def stages(self, images: torch.Tensor, fused: bool = True) -> dict[str, torch.Tensor]:
        """Every inference step on padded-size ``images`` (eval mode): features, token ids, maskige, class map,
        output. Used by tests (fused vs reference) and the stage benchmark."""
        _feats, x = self.head_features(images)
        ids = self.token_ids(x, fused)
        maskige = self.decode_maskige(ids, fused)
        out: dict[str, torch.Tensor] = {"features": x, "tokens": ids, "maskige": maskige}
        if self.inverse is not None:
            logits = self.inverse(maskige)
            out["class_map"] = logits.argmax(1)
            s = self.maskige_scale
            out["output"] = F.avg_pool2d(logits, s, s) if s > 1 else logits
        else:
            out["class_map"] = self.maskige_to_classes(maskige, fused)
            out["output"] = self.vote(out["class_map"])
        return out

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # token argmax: nothing upstream of the maskige is differentiable here
            _, x = self.head_features(images)
            ids = self.token_ids(x, fused=True)
            maskige = self.decode_maskige(ids, fused=True)
        if self.inverse is not None:
            logits = self.inverse(maskige)
            s = self.maskige_scale
            return F.avg_pool2d(logits, s, s) if s > 1 else logits
        return self.vote(self.maskige_to_classes(maskige, fused=True))

    # ---- training ---------------------------------------------------------------------------------------------------

    def encode_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """X on class ids at the maskige resolution: (B, sH, sW) -> (B, 3, sH, sW) in [0, 1]."""
        return masks_to_maskige(masks, self.maskige_palette, self.ignore_index)

    @torch.no_grad()
    def make_targets(self, masks: torch.Tensor, aux_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spec A.4 targets. ``masks`` (B, H, W) at input size, ``aux_pred`` (B, sH, sW) auxiliary class ids.

        Returns ``(labels, tokens)``: labels upsampled to the maskige resolution (ignore kept, for the pixel loss)
        and token ids (B, H/4, W/4) of the maskige of the ignore-filled labels, with ``vocab_size`` where the whole
        patch is ignore.
        """
        labels = upsample_labels(masks, self.maskige_scale, self.num_classes, self.ignore_index)
        filled = fill_ignore(labels, aux_pred, self.ignore_index)
        tokens = self.tokenizer.encode(self.encode_masks(filled))
        drop = token_ignore_mask(labels, self.tokenizer.downsample, self.ignore_index)
        tokens = torch.where(drop, torch.full_like(tokens, self.tokenizer.vocab_size), tokens)
        return labels, tokens

    def _padded_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = self.check_batch(batch)
        multiple = self.pretrained_cfg.divisible_by
        return pad_to_multiple(images, multiple), pad_to_multiple(masks, multiple, value=self.ignore_index).long()

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage ``"prior"``: 0.8 token CE + 0.2 pixel CE (spec A.4). Stage ``"inverse"``: FT-W CE at GT size."""
        images, masks = self._padded_batch(batch)
        if self.stage == "inverse":
            with torch.no_grad():
                _, x = self.head_features(images)
                maskige = self.decode_maskige(self.token_ids(x, fused=True), fused=True)
            logits = self.inverse(maskige)
            logits = resize(logits, masks.shape[-2:])
            ce = _ce_over_all(logits, masks, self.ignore_index)
            return {"loss": ce, "loss_inverse": ce.detach()}
        feats, x = self.head_features(images)
        token_logits = self.head.token_logits(x)
        size = (images.shape[-2] * self.maskige_scale, images.shape[-1] * self.maskige_scale)
        pixel_logits = resize(self.head.pixel_logits(feats), size)
        labels, tokens = self.make_targets(masks, pixel_logits.detach().argmax(1))
        loss_token = _ce_over_all(token_logits, tokens, self.tokenizer.vocab_size)
        loss_pixel = _ce_over_all(pixel_logits, labels, self.ignore_index)
        total = self.token_weight * loss_token + self.pixel_weight * loss_pixel
        with torch.no_grad():
            valid = tokens != self.tokenizer.vocab_size
            acc = (token_logits.argmax(1) == tokens)[valid].float().mean() if bool(valid.any()) else total.new_zeros(())
        return {
            "loss": total,
            "loss_token": loss_token.detach(),
            "loss_pixel": loss_pixel.detach(),
            "token_acc": acc.detach(),
        }


# --------------------------------------------------------------------------------------------------------------------
# Registered models
# --------------------------------------------------------------------------------------------------------------------

# Small CPU configuration: the GSS head scaled down (128 / 256 / 8 heads / window 8 / 512 hidden) over a small
# maskige VQ-VAE (vocab 512, code 32, downsampling 4, maskige at the input resolution).
_SMALL_HEAD = {"channels": 128, "fused": 256, "depth": 2, "heads": 8, "window": 8, "hidden": 512, "pixel_channels": 128}
_SMALL_INVERSE = {"channels": 64, "depth": 2, "heads": 4, "window": 8}
_SMALL_TOKENIZER = {"vocab_size": 512, "code_dim": 32, "width": 64, "downsample": 4}


def _small(variant: str, **kwargs: Any) -> GSSSegmenter:
    kwargs.setdefault("tokenizer", "vqvae")
    kwargs.setdefault("tokenizer_kwargs", _SMALL_TOKENIZER)
    kwargs.setdefault("maskige_scale", 1)
    kwargs.setdefault("head_kwargs", _SMALL_HEAD)
    kwargs.setdefault("inverse_kwargs", _SMALL_INVERSE)
    return GSSSegmenter(backbone=kwargs.pop("backbone", "resnet18"), variant=variant, **kwargs)


def _paper(backbone: str, variant: str, depth: int, inverse_depth: int = 2, **kwargs: Any) -> GSSSegmenter:
    # Paper geometry: DALL-E dVAE (8192 x 128-d codes, downsampling 8), maskige at 2x the input; head of spec A.2.
    kwargs.setdefault("tokenizer", "dalle")
    kwargs.setdefault("maskige_scale", 2)
    kwargs.setdefault(
        "head_kwargs",
        {
            "channels": 384,
            "fused": 512,
            "depth": depth,
            "heads": 16,
            "window": 7,
            "hidden": 2048,
            "pixel_channels": 384,
        },
    )
    kwargs.setdefault("inverse_kwargs", {"channels": 128, "depth": inverse_depth, "heads": 4, "window": 7})
    return GSSSegmenter(backbone=backbone, variant=variant, **kwargs)


_SMALL_DIFFERS = (
    "small VQ-VAE tokenizer (vocab 512, 32-d codes, downsampling 4, maskige at the input resolution) fitted by fastseg "
    "instead of the off-the-shelf DALL-E dVAE (8192 codes, downsampling 8, maskige at 2x): fitted on images only "
    "(fit-tokenizer --on images, the paper's premise of a tokenizer never trained on masks) or on maskiges with a "
    "class-aware palette term (--on masks, ours, not the paper's); head scaled down (128 / 256 channels, 8 heads, "
    "window 8, hidden 512; paper: 384 / 512, 16 heads, window 7, hidden 2048); ResNet-18 backbone"
)


@register_model(tag="shapes_small", differs_from_paper=_SMALL_DIFFERS)
def gss_ff_resnet18(**kwargs: Any) -> GSSSegmenter:
    """GSS-FF, ResNet-18, scaled-down head, small maskige VQ-VAE (the CPU-trainable configuration)."""
    return _small("ff", **kwargs)


@register_model(tag="shapes_small", differs_from_paper=_SMALL_DIFFERS + "; inverse 64 wide, window 8 (paper: 128, 7)")
def gss_ftw_resnet18(**kwargs: Any) -> GSSSegmenter:
    """GSS-FT-W of `gss_ff_resnet18` (load its weights with ``load_prior``; trains only the inverse)."""
    return _small("ftw", **kwargs)


@register_model
def gss_ff_resnet50(**kwargs: Any) -> GSSSegmenter:
    """GSS-FF, ResNet-50, paper head (Swin depth 6, as for ResNet backbones), DALL-E dVAE."""
    return _paper("resnet50", "ff", depth=6, **kwargs)


@register_model
def gss_ff_swin_large(**kwargs: Any) -> GSSSegmenter:
    """GSS-FF, Swin-L, paper head (Swin depth 2), DALL-E dVAE (ADE20K configuration)."""
    return _paper("swin_large", "ff", depth=2, **kwargs)


@register_model
def gss_ftw_swin_large(**kwargs: Any) -> GSSSegmenter:
    """GSS-FT-W, Swin-L: `gss_ff_swin_large` + the learned inverse (depth 2, ADE20K configuration)."""
    return _paper("swin_large", "ftw", depth=2, **kwargs)
