"""UniMatch (Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic Segmentation", CVPR 2023):
the semi-supervised base of S4MIM (specs/pading_semples_s4mim.md E.3), on a compact DeepLabV3+.

One training step sees a labelled batch ``x, y`` and two unlabelled batches ``u`` (trained on) and ``u_mix`` (the
CutMix source). Weak view = the image as given; two strong views per unlabelled image (colour jitter p=0.8, grayscale
p=0.2, Gaussian blur p=0.5, then CutMix p=0.5 with a box from the ``u_mix`` strong view). Pseudo-labels are the
argmax of the weak-view prediction (train mode, detached); for the pasted boxes they come from the prediction on
``u_mix`` in **eval mode, without gradient** (UniMatch's teacher is the same network, no EMA). Pixels count in the
unsupervised terms only where the confidence reaches ``tau``; every unsupervised term is divided by the number of
valid pixels (not by the confident ones), as upstream. The feature-perturbation stream decodes ``Dropout2d(0.5)``
of the low-level (c1) and high-level (c4) encoder features of ``u``::

    L = (CE(x, y) + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2

Differences from upstream, all deliberate: augmentations run batched on tensors (GPU friendly) in a fixed order
(jitter -> grayscale -> blur) with a YIQ rotation for the hue jitter, and draw every random number from a
``torch.Generator`` seeded by the batch (``"aug_seed"``) so that a resumed run repeats them exactly; the
feature-perturbation stream decodes only the unlabelled half (upstream decodes the labelled half too and discards
it); the head uses GroupNorm (small CPU batches) where upstream uses BatchNorm.

`SemiSupervisedPairs` turns a labelled and an unlabelled dataset into one map-style dataset, so that the ordinary
`fastseg.engine.train` loop drives semi-supervised training unchanged; unlabelled masks never leave it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ._base import SegmentationModel, resolve_cfg
from .backbones import create_backbone

__all__ = [
    "ASPP",
    "DeepLabV3PlusSemi",
    "SemiSupervisedPairs",
    "cutmix_boxes",
    "masked_pixel_ce",
    "strong_augment",
]


# ----------------------------------------------------------------------------------------------------------------
# Data: labelled + unlabelled pairs for the ordinary training loop
# ----------------------------------------------------------------------------------------------------------------
class SemiSupervisedPairs(Dataset):
    """Map-style dataset whose item ``i`` joins one labelled and two unlabelled samples, all drawn from ``i``.

    Item ``i`` holds ``"image"`` / ``"mask"`` of a labelled sample, ``"image_u"`` (the unlabelled image trained on),
    ``"image_u_mix"`` (a second unlabelled image, the CutMix source) and ``"aug_seed"`` (int64, seeds the model's
    augmentations). The three indices come from a generator seeded with ``(seed, i)``, so the item is a pure function
    of ``i``: the engine's ``(seed, step)`` data order makes every step reproducible and resumable. Only the images of
    unlabelled samples are read; their masks (kept by the shapes world for evaluation) never appear in an item.

    Args:
        labelled: dataset of dicts with ``"image"`` and ``"mask"`` (e.g. ``ShapesDataset(subset="labelled")``).
        unlabelled: dataset of dicts with ``"image"``.
        length: number of items (the pairing is random, so any length works; large lengths cost nothing).
        seed: seeds the pairing.

    Raises:
        ValueError: an empty dataset, or a "labelled" sample whose ``"labelled"`` flag is False.
    """

    def __init__(self, labelled: Dataset, unlabelled: Dataset, length: int = 10**6, seed: int = 0) -> None:
        if len(labelled) < 1 or len(unlabelled) < 1:
            raise ValueError(f"SemiSupervisedPairs needs non-empty datasets, got {len(labelled)} labelled and "
                             f"{len(unlabelled)} unlabelled samples")
        if length < 1:
            raise ValueError(f"SemiSupervisedPairs: length must be >= 1, got {length}")
        self.labelled, self.unlabelled, self.length, self.seed = labelled, unlabelled, int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def indices(self, i: int) -> tuple[int, int, int]:
        """``(labelled index, unlabelled index, unlabelled mix index)`` of item ``i``."""
        rng = np.random.default_rng([self.seed, int(i)])
        n_u = len(self.unlabelled)
        lab = int(rng.integers(len(self.labelled)))
        u = int(rng.integers(n_u))
        mix = (u + 1 + int(rng.integers(n_u - 1))) % n_u if n_u > 1 else u  # a different image when there is one
        return lab, u, mix

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for SemiSupervisedPairs of length {self.length}")
        lab, u, mix = self.indices(i)
        sample = self.labelled[lab]
        flag = sample.get("labelled")
        if flag is not None and not bool(flag):
            raise ValueError(f"SemiSupervisedPairs: labelled sample {lab} carries labelled=False; pass the labelled "
                             f"subset (ShapesDataset(subset='labelled')) as the first dataset")
        return {
            "image": sample["image"],
            "mask": sample["mask"],
            "image_u": self.unlabelled[u]["image"],
            "image_u_mix": self.unlabelled[mix]["image"],
            "aug_seed": torch.tensor(int(np.random.default_rng([self.seed, i, 1]).integers(2**62)), dtype=torch.int64),
        }


def batch_generator(batch: dict[str, Any], device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by the batch's ``"aug_seed"`` (else one draw of the global torch RNG, which
    the engine checkpoints and restores, so both ways resume exactly)."""
    if "aug_seed" in batch:
        seeds = batch["aug_seed"].reshape(-1).long().cpu()
        seed = int(sum(int(s) * (2 * k + 1) for k, s in enumerate(seeds.tolist())) % (2**62))
    else:
        seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Strong augmentations on normalised tensors
# ----------------------------------------------------------------------------------------------------------------
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (reflect padding)."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * C, k)
    flat = x.reshape(1, b * c, h, w)
    pad_w, pad_h = min(radius, w - 1), min(radius, h - 1)
    flat = F.pad(flat, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else flat
    flat = F.conv2d(flat, kernel[:, None, None, radius - pad_w: radius + pad_w + 1], groups=b * c)
    flat = F.pad(flat, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else flat
    flat = F.conv2d(flat, kernel[:, None, radius - pad_h: radius + pad_h + 1, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def strong_augment(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], generator: torch.Generator,
                   p_jitter: float = 0.8, jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
                   p_gray: float = 0.2, p_blur: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0),
                   blur_radius: int = 6) -> torch.Tensor:
    """UniMatch's strong photometric view of normalised images, per image, batched.

    Un-normalise to [0, 1]; with probability ``p_jitter`` scale brightness by ``U[1-b, 1+b]``, blend contrast towards
    the image's mean luma by ``U[1-c, 1+c]``, blend saturation towards the luma image by ``U[1-s, 1+s]`` and rotate the
    hue by ``U[-h, h]`` turns (a rotation of the chroma plane in YIQ space); with ``p_gray`` replace by luma; with
    ``p_blur`` blur with sigma ``U[blur_sigma]``; clamp to [0, 1] after each step and normalise again.
    """
    b, device = images.shape[0], images.device
    m = torch.as_tensor(mean, dtype=images.dtype, device=device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=device).view(1, 3, 1, 1)
    luma_w = torch.tensor(_LUMA, dtype=images.dtype, device=device).view(1, 3, 1, 1)
    x = (images * s + m).clamp(0, 1)
    # Draw every random number up front, in a fixed order, whatever is applied (stable streams).
    do_jit = torch.rand(b, generator=generator, device=device) < p_jitter
    br, co, sa, hu = jitter
    bright = _uniform(b, 1 - br, 1 + br, generator, device)
    contrast = _uniform(b, 1 - co, 1 + co, generator, device)
    saturation = _uniform(b, 1 - sa, 1 + sa, generator, device)
    hue = _uniform(b, -hu, hu, generator, device)
    do_gray = torch.rand(b, generator=generator, device=device) < p_gray
    do_blur = torch.rand(b, generator=generator, device=device) < p_blur
    sigma = _uniform(b, blur_sigma[0], blur_sigma[1], generator, device)

    def per_image(v: torch.Tensor) -> torch.Tensor:
        return v.to(images.dtype).view(b, 1, 1, 1)

    j = (x * per_image(bright)).clamp(0, 1)
    grey_mean = (j * luma_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    j = ((j - grey_mean) * per_image(contrast) + grey_mean).clamp(0, 1)
    grey = (j * luma_w).sum(1, keepdim=True)
    j = ((j - grey) * per_image(saturation) + grey).clamp(0, 1)
    yiq = torch.tensor(_RGB_TO_YIQ, dtype=images.dtype, device=device)
    angle = 2 * math.pi * hue.to(images.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(b, 3, 3, dtype=images.dtype, device=device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    transform = torch.linalg.inv(yiq) @ rot @ yiq  # (B, 3, 3) RGB -> RGB
    j = torch.einsum("bij,bjhw->bihw", transform, j).clamp(0, 1)
    x = torch.where(per_image(do_jit).bool(), j, x)
    grey = (x * luma_w).sum(1, keepdim=True).expand_as(x)
    x = torch.where(per_image(do_gray).bool(), grey, x)
    x = torch.where(per_image(do_blur).bool(), _gaussian_blur(x, sigma.to(images.dtype), blur_radius).clamp(0, 1), x)
    return (x - m) / s


def cutmix_boxes(batch: int, height: int, width: int, generator: torch.Generator, device: torch.device,
                 p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """UniMatch's CutMix boxes: with probability ``p`` per image a box of area ``U[area] * H * W`` and aspect ratio
    ``U[aspect]`` (clipped to the image), placed uniformly inside it. Returns a (B, H, W) bool mask."""
    apply = torch.rand(batch, generator=generator, device=device) < p
    size = _uniform(batch, area[0], area[1], generator, device) * height * width
    ratio = _uniform(batch, aspect[0], aspect[1], generator, device)
    box_w = torch.sqrt(size * ratio).floor().clamp(1, width)
    box_h = torch.sqrt(size / ratio).floor().clamp(1, height)
    x0 = (torch.rand(batch, generator=generator, device=device) * (width - box_w + 1)).floor()
    y0 = (torch.rand(batch, generator=generator, device=device) * (height - box_h + 1)).floor()
    cols = torch.arange(width, device=device).view(1, 1, width)
    rows = torch.arange(height, device=device).view(1, height, 1)
    inside_x = (cols >= x0.view(-1, 1, 1)) & (cols < (x0 + box_w).view(-1, 1, 1))
    inside_y = (rows >= y0.view(-1, 1, 1)) & (rows < (y0 + box_h).view(-1, 1, 1))
    return inside_x & inside_y & apply.view(-1, 1, 1)


def masked_pixel_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """UniMatch's unsupervised CE: per-pixel CE kept where ``keep``, summed, divided by the number of ``valid``
    pixels (all pixels when None), not by the kept ones."""
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    denominator = ce.new_tensor(float(target.numel())) if valid is None else valid.sum().clamp(min=1).to(ce.dtype)
    return (ce * keep.to(ce.dtype)).sum() / denominator


# ----------------------------------------------------------------------------------------------------------------
# DeepLabV3+
# ----------------------------------------------------------------------------------------------------------------
def _conv_gn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                   bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1x1 branch, one 3x3 branch per dilation ``rate``, an image-pooling
    branch, concatenated and projected (with dropout 0.5, as in UniMatch's head)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (6, 12, 18),
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_gn_relu(in_channels, out_channels)])
        self.branches.extend(_conv_gn_relu(in_channels, out_channels, 3, rate) for rate in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_gn_relu(in_channels, out_channels))
        self.project = nn.Sequential(_conv_gn_relu(out_channels * (len(rates) + 2), out_channels),
                                     nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3PlusSemi(SegmentationModel):
    """DeepLabV3+ (encoder at output stride 16, ASPP, a stride-4 decoder) trained with UniMatch when the batch
    carries unlabelled images, and with plain cross-entropy otherwise.

    Args:
        backbone: fastseg backbone name (a ResNet; its last stage is dilated to output stride 16).
        num_classes: K (default: the shapes world's).
        aspp_channels: ASPP / decoder width (256 in DeepLabV3+).
        aspp_rates: ASPP dilations (6, 12, 18 at output stride 16 in the paper; smaller for small images).
        low_level_channels: width of the projected c1 features (48 in DeepLabV3+).
        tau: confidence threshold of the pseudo-labels (0.95 on Pascal, 0 on Cityscapes in UniMatch).
        fp_dropout: Dropout2d rate of the feature-perturbation stream.
        unsup_weights: weights of ``(L_s1, L_s2, L_fp)``; the total is ``(L_sup + sum) / 2``.
        cutmix_p: probability of a CutMix box per strong view.
        backbone_checkpoint: local weights file for the backbone.

    ``model.loss(batch)``: with ``"image_u"`` and ``"image_u_mix"`` in the batch the UniMatch loss (components
    ``sup``, ``s1``, ``s2``, ``fp``, ``conf_ratio``), else the supervised cross-entropy alone.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        aspp_channels: int = 256,
        aspp_rates: Sequence[int] = (6, 12, 18),
        low_level_channels: int = 48,
        tau: float = 0.95,
        fp_dropout: float = 0.5,
        unsup_weights: tuple[float, float, float] = (0.25, 0.25, 0.5),
        cutmix_p: float = 0.5,
        backbone_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if not backbone.startswith("resnet"):
            raise ValueError(f"DeepLabV3+ here dilates a ResNet's last stage; got backbone {backbone!r}")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {tau!r}")
        self.backbone = create_backbone(backbone, checkpoint=backbone_checkpoint, output_stride=16)
        self.pretrained_cfg = resolve_cfg(num_classes, output_stride=self.backbone.reductions[0],
                                          divisible_by=self.backbone.divisible_by)
        c1, c4 = self.backbone.channels[0], self.backbone.channels[-1]
        self.aspp = ASPP(c4, aspp_channels, aspp_rates)
        self.reduce_low = _conv_gn_relu(c1, low_level_channels)
        self.fuse = nn.Sequential(_conv_gn_relu(aspp_channels + low_level_channels, aspp_channels, 3),
                                  _conv_gn_relu(aspp_channels, aspp_channels, 3))
        self.classifier = nn.Conv2d(aspp_channels, self.num_classes, 1)
        self.decoder_channels = aspp_channels
        self.tau, self.fp_dropout, self.cutmix_p = float(tau), float(fp_dropout), float(cutmix_p)
        self.unsup_weights = tuple(float(w) for w in unsup_weights)

    # -- network ------------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-level (stride 4) and high-level (stride 16) encoder features of padded images."""
        feats = self.backbone(images)
        return feats[0], feats[-1]

    def decode(self, c1: torch.Tensor, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, decoder features)``, both at the resolution of ``c1`` (stride 4)."""
        high = F.interpolate(self.aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=False)
        feats = self.fuse(torch.cat([high, self.reduce_low(c1)], 1))
        return self.classifier(feats), feats

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(images))[0]

    def _pad(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = images.shape[-2:]
        m = self.pretrained_cfg.divisible_by
        if h % m or w % m:
            images = F.pad(images, (0, (-w) % m, 0, (-h) % m), mode="replicate")
        stride = self.pretrained_cfg.output_stride
        return images, (math.ceil(h / stride), math.ceil(w / stride))

    def encode_padded(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encoder features of images of any size, plus the stride-4 size to crop decoder outputs to."""
        padded, crop = self._pad(images)
        c1, c4 = self.encode(padded)
        return c1, c4, crop

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, decoder features)`` at stride 4 (cropped) for images of any size, in the current mode."""
        c1, c4, (h, w) = self.encode_padded(images)
        logits, feats = self.decode(c1, c4)
        return logits[..., :h, :w], feats[..., :h, :w]

    def up(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    # -- losses -------------------------------------------------------------------------------------------------
    def supervised_terms(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CE, logits at stride 4)`` of a labelled batch."""
        logits, _ = self.run(images)
        ce = F.cross_entropy(self.up(logits, masks.shape[-2:]), masks.long(), ignore_index=self.ignore_index)
        return ce, logits

    def unimatch_terms(self, batch: dict[str, Any], generator: torch.Generator
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """UniMatch's loss terms and a context for methods built on top (``logits_x``, ``logits_u`` at stride 4 with
        gradient, ``pseudo`` (B_u, H, W) with ``ignore_index`` below ``tau``)."""
        images, masks = self.check_batch(batch)
        u, u_mix = batch["image_u"], batch["image_u_mix"]
        if u.shape != u_mix.shape or u.shape[1:] != images.shape[1:]:
            raise ValueError(f"batch['image_u'] {tuple(u.shape)} and batch['image_u_mix'] {tuple(u_mix.shape)} must "
                             f"have the same shape, with the labelled images' C, H, W {tuple(images.shape[1:])}")
        n_l, n_u, size = images.shape[0], u.shape[0], tuple(images.shape[-2:])
        cfg = self.pretrained_cfg
        strong = [strong_augment(torch.cat([u, u_mix]), cfg.mean, cfg.std, generator) for _ in range(2)]
        boxes = [cutmix_boxes(n_u, *size, generator, u.device, p=self.cutmix_p) for _ in range(2)]

        with torch.no_grad():  # the teacher on the CutMix source: same network, eval mode
            was_training = self.training
            self.eval()
            conf_mix, label_mix = self.up(self.run(u_mix)[0], size).softmax(1).max(1)
            self.train(was_training)

        c1, c4, (h, w) = self.encode_padded(torch.cat([images, u]))
        logits, _ = self.decode(c1, c4)
        logits = logits[..., :h, :w]
        drop = F.dropout2d
        logits_fp, _ = self.decode(drop(c1[n_l:], self.fp_dropout, self.training),
                                   drop(c4[n_l:], self.fp_dropout, self.training))
        logits_fp = logits_fp[..., :h, :w]
        mixed = [torch.where(box[:, None], view[n_u:], view[:n_u]) for view, box in zip(strong, boxes)]
        logits_s1, logits_s2 = self.up(self.run(torch.cat(mixed))[0], size).chunk(2)

        logits_x, logits_u = logits[:n_l], logits[n_l:]
        with torch.no_grad():
            conf_u, label_u = self.up(logits_u.detach(), size).softmax(1).max(1)
        sup = F.cross_entropy(self.up(logits_x, size), masks.long(), ignore_index=self.ignore_index)
        w1, w2, w_fp = self.unsup_weights
        terms: dict[str, torch.Tensor] = {"sup": sup}
        for name, logits_s, box in (("s1", logits_s1, boxes[0]), ("s2", logits_s2, boxes[1])):
            target = torch.where(box, label_mix, label_u)
            conf = torch.where(box, conf_mix, conf_u)
            terms[name] = masked_pixel_ce(logits_s, target, conf >= self.tau)
        terms["fp"] = masked_pixel_ce(self.up(logits_fp, size), label_u, conf_u >= self.tau)
        terms["loss"] = (sup + w1 * terms["s1"] + w2 * terms["s2"] + w_fp * terms["fp"]) / 2
        terms["conf_ratio"] = (conf_u >= self.tau).float().mean().detach()
        pseudo = torch.where(conf_u >= self.tau, label_u, torch.full_like(label_u, self.ignore_index))
        return terms, {"logits_x": logits_x, "logits_u": logits_u, "pseudo": pseudo, "images": images,
                       "masks": masks, "u": u}

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "image_u" not in batch:
            images, masks = self.check_batch(batch)
            ce, _ = self.supervised_terms(images, masks)
            return {"loss": ce, "sup": ce.detach()}
        terms, _ = self.unimatch_terms(batch, batch_generator(batch, batch["image"].device))
        return {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}
