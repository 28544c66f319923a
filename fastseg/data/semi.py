"""Semi-supervised data (UniMatch, Yang et al., CVPR 2023; the base of S4MIM): labelled + unlabelled pairs for the
ordinary training loop, UniMatch's strong photometric augmentations and CutMix boxes, all batched on tensors.

`SemiSupervisedPairs` turns a labelled and an unlabelled dataset into one map-style dataset, so that the ordinary
`fastseg.engine.train` loop drives semi-supervised training unchanged; unlabelled masks never leave it. Every random
number of the augmentations comes from a ``torch.Generator`` seeded by the batch (`batch_generator`, from
``"aug_seed"``), so that a resumed run repeats them exactly. Differences from upstream, all deliberate: a fixed order
(jitter -> grayscale -> blur) and a YIQ rotation for the hue jitter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "STRONG_AUGMENT_OPTIONS",
    "SemiSupervisedPairs",
    "batch_generator",
    "check_strong_augment_options",
    "cutmix_boxes",
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
            raise ValueError(
                f"SemiSupervisedPairs needs non-empty datasets, got {len(labelled)} labelled and "
                f"{len(unlabelled)} unlabelled samples"
            )
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
            raise ValueError(
                f"SemiSupervisedPairs: labelled sample {lab} carries labelled=False; pass the labelled "
                f"subset (ShapesDataset(subset='labelled')) as the first dataset"
            )
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
    flat = F.conv2d(flat, kernel[:, None, None, radius - pad_w : radius + pad_w + 1], groups=b * c)
    flat = F.pad(flat, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else flat
    flat = F.conv2d(flat, kernel[:, None, radius - pad_h : radius + pad_h + 1, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def strong_augment(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    p_jitter: float = 0.8,
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
    p_gray: float = 0.2,
    p_blur: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    blur_radius: int = 6,
) -> torch.Tensor:
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


STRONG_AUGMENT_OPTIONS = ("p_jitter", "jitter", "p_gray", "p_blur", "blur_sigma", "blur_radius")


def check_strong_augment_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated keyword overrides of `strong_augment` (None or empty: UniMatch's own strong view), with sequences as
    tuples. Raises ValueError naming an unknown option or a bad value."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"strong augmentation options must be a mapping or None, got {type(options).__name__}")
    unknown = sorted(set(options) - set(STRONG_AUGMENT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown strong augmentation option(s) {unknown}; known: {STRONG_AUGMENT_OPTIONS}")
    out = dict(options)
    for key in ("p_jitter", "p_gray", "p_blur"):
        if key in out and not 0.0 <= float(out[key]) <= 1.0:
            raise ValueError(f"strong augmentation: {key} must lie in [0, 1], got {out[key]!r}")
    if "jitter" in out:
        jitter = tuple(float(v) for v in out["jitter"])
        if len(jitter) != 4 or min(jitter) < 0 or max(jitter[:3]) > 1 or jitter[3] > 0.5:
            raise ValueError(
                "strong augmentation: jitter must be (brightness, contrast, saturation, hue) with the first three in "
                f"[0, 1] and hue in [0, 0.5], got {out['jitter']!r}"
            )
        out["jitter"] = jitter
    if "blur_sigma" in out:
        sigma = tuple(float(v) for v in out["blur_sigma"])
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            raise ValueError(
                f"strong augmentation: blur_sigma must be (lo, hi) with 0 < lo <= hi, got {out['blur_sigma']!r}"
            )
        out["blur_sigma"] = sigma
    if "blur_radius" in out and (
        isinstance(out["blur_radius"], bool) or not isinstance(out["blur_radius"], int) or out["blur_radius"] < 1
    ):
        raise ValueError(f"strong augmentation: blur_radius must be a positive int, got {out['blur_radius']!r}")
    return out


def cutmix_boxes(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    device: torch.device,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
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
