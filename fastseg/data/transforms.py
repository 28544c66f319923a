"""The training pipeline of the real-dataset benchmarks, and the evaluation protocols they are scored with.

Training (mmsegmentation's standard pipeline, which GSS, ECENet and the semi-supervised papers train with):

1. **random resize**: a ratio ``r`` is drawn uniformly from ``ratio_range`` (0.5-2.0) and the image is resized, keeping
   its aspect ratio, to fit inside ``(long * r, short * r)`` of the base ``scale`` (e.g. ADE20K ``(2048, 512)``:
   the long side at most ``2048 r`` and the short side at most ``512 r``); labels use nearest neighbour;
2. **random crop** of ``crop_size`` with the *max-category-ratio* check: up to 10 crops are drawn and the first one in
   which no single class covers ``cat_max_ratio`` (0.75) or more of the labelled pixels is kept (the last draw
   otherwise), so crops of pure sky or pure road are rare;
3. **horizontal flip** with probability ``flip_prob``;
4. **photometric distortion**: brightness (+-32), contrast (x 0.5-1.5, before or after the colour terms), saturation
   (x 0.5-1.5) and hue (+-18 of OpenCV's 180-degree scale), each with probability 0.5. Saturation and hue go through
   Pillow's 8-bit HSV conversion (mmseg uses OpenCV's), so the colours differ from mmseg's by rounding only;
5. normalisation and **padding** to ``crop_size`` (image 0 after normalisation = the mean colour; labels
   ``ignore_index``; instance ids 0).

Randomness comes from the ``numpy.random.Generator`` passed in; the datasets draw its seed from torch's RNG, which
the DataLoader seeds per worker and the trainer seeds per run, so runs repeat exactly with ``num_workers=0``.

Evaluation (:class:`EvalProtocol`): whole image or sliding window, optionally after a keep-ratio resize to the
dataset's test scale, optionally over several scales and horizontal flips (``fastseg.engine.inference`` runs it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "MS_RATIOS",
    "EvalProtocol",
    "TrainPipeline",
    "photometric_distortion",
    "random_crop_box",
    "rescale_size",
]

# mmsegmentation's multi-scale test ratios (``img_ratios`` of its ``MultiScaleFlipAug`` configs).
MS_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _pair(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {value!r}")
    return value  # type: ignore[return-value]


def rescale_size(height: int, width: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """(H, W) after a keep-ratio resize into ``scale * ratio``, mmseg's ``keep_ratio=True`` rule.

    ``scale`` is ``(long, short)`` bounds in either order (mmseg writes ``(2048, 512)``): the factor is
    ``min(max_edge / long_side, min_edge / short_side)``, so the long side is at most ``max_edge`` and the short side
    at most ``min_edge``; sides are rounded half up.
    """
    if height < 1 or width < 1:
        raise ValueError(f"cannot rescale an image of size {height}x{width}")
    max_edge, min_edge = max(scale) * ratio, min(scale) * ratio
    factor = min(max_edge / max(height, width), min_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def random_crop_box(
    mask: np.ndarray,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float = 1.0,
    ignore_index: int = 255,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A crop window ``(y0, y1, x0, x1)`` of at most ``crop_size``, redrawn while one class dominates it.

    The check counts labelled pixels only and accepts a crop with at least two classes whose largest share is below
    ``cat_max_ratio`` (mmseg's ``RandomCrop``); ``cat_max_ratio >= 1`` disables it. After ``attempts`` rejected draws
    the last one is used.
    """
    h, w = mask.shape[:2]
    ch, cw = crop_size

    def draw() -> tuple[int, int, int, int]:
        y0 = int(rng.integers(0, max(h - ch, 0) + 1))
        x0 = int(rng.integers(0, max(w - cw, 0) + 1))
        return y0, min(y0 + ch, h), x0, min(x0 + cw, w)

    box = draw()
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(attempts - 1):
        y0, y1, x0, x1 = box
        counts = np.bincount(mask[y0:y1, x0:x1].ravel())  # labels are small non-negative ints
        if ignore_index < counts.size:
            counts[ignore_index] = 0
        counts = counts[counts > 0]
        if counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = draw()
    return box


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on an (H, W, 3) uint8 image; returns float32 in [0, 255].

    Brightness, contrast (before or after the colour terms, chosen at random), saturation, hue; each applied with
    probability 0.5. See the module docstring for the one difference from mmseg (8-bit HSV through Pillow).
    """
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        img *= contrast
    do_saturation = rng.random() < 0.5
    saturation = rng.uniform(0.5, 1.5)
    do_hue = rng.random() < 0.5
    hue_delta = int(rng.integers(-18, 19))
    if do_saturation or do_hue:
        hsv = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if do_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if do_hue:
            # OpenCV's hue spans 180 per turn, Pillow's 256: the same +-0.1 turn as mmseg.
            hsv[..., 0] = np.mod(hsv[..., 0] + hue_delta * 256.0 / 180.0, 256.0)
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and contrast is not None:
        img *= contrast
    return np.clip(img, 0, 255, out=img)


@dataclass(frozen=True)
class TrainPipeline:
    """Random resize, crop with the category-ratio check, flip and photometric distortion (see the module docstring).

    Called on a sample of NumPy arrays: ``"image"`` (H, W, 3) uint8, ``"mask"`` (H, W) integer labels and optionally
    more (H, W) label maps (``"instances"``, ``"crowd"``, ...: nearest-neighbour resize, padded with 0); returns the
    same keys at ``crop_size`` (image float32 in [0, 255], not yet normalised) plus ``"valid"``, an (H, W) bool that
    is False on the padding.

    Attributes:
        scale: base ``(long, short)`` bound of the keep-ratio resize (mmseg ``img_scale``); ``None`` keeps the size.
        ratio_range: the resize ratio is drawn uniformly from this range.
        crop_size: (H, W) of the output.
        cat_max_ratio: largest share one class may have in a crop (1.0 disables the check).
        flip_prob: probability of a horizontal flip.
        photometric: apply :func:`photometric_distortion`.
        ignore_index: label of padding and of pixels the check does not count.
    """

    scale: tuple[int, int] | None = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _pair(self.scale, "TrainPipeline.scale"))
        object.__setattr__(self, "crop_size", _pair(self.crop_size, "TrainPipeline.crop_size"))
        lo, hi = (float(r) for r in self.ratio_range)
        if not 0 < lo <= hi:
            raise ValueError(f"TrainPipeline.ratio_range must satisfy 0 < low <= high, got {self.ratio_range!r}")
        object.__setattr__(self, "ratio_range", (lo, hi))
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"TrainPipeline.cat_max_ratio must lie in (0, 1], got {self.cat_max_ratio!r}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"TrainPipeline.flip_prob must lie in [0, 1], got {self.flip_prob!r}")

    def with_options(self, **changes: Any) -> TrainPipeline:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def __call__(self, sample: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, mask = sample["image"], sample["mask"]
        # Every other (H, W) entry (instance ids, crowd flags, ...) is a label map: nearest resize, same crop / flip.
        extra = {key: value for key, value in sample.items() if key not in ("image", "mask")}
        h, w = mask.shape
        if self.scale is not None:
            ratio = rng.uniform(*self.ratio_range)
            nh, nw = rescale_size(h, w, self.scale, ratio)
            if (nh, nw) != (h, w):
                image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
                mask = _resize_nearest(mask, nh, nw)
                extra = {key: _resize_nearest(value, nh, nw) for key, value in extra.items()}
        y0, y1, x0, x1 = random_crop_box(mask, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
        image, mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        extra = {key: value[y0:y1, x0:x1] for key, value in extra.items()}
        if rng.random() < self.flip_prob:
            image, mask = image[:, ::-1], mask[:, ::-1]
            extra = {key: value[:, ::-1] for key, value in extra.items()}
        image = photometric_distortion(image, rng) if self.photometric else image.astype(np.float32)
        out = {"image": image, "mask": mask, "valid": np.ones(mask.shape, bool), **extra}
        return _pad_to(out, self.crop_size, self.ignore_index)


def _resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (8-bit maps as mode 'L', others through 32-bit mode 'I')."""
    if labels.dtype == np.bool_:
        return _resize_nearest(labels.astype(np.uint8), height, width).astype(bool)
    if labels.dtype == np.uint8:
        return np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))
    resized = Image.fromarray(labels.astype(np.int32)).resize((width, height), Image.NEAREST)
    return np.asarray(resized).astype(labels.dtype, copy=False)


def _pad_to(sample: dict[str, np.ndarray], size: tuple[int, int], ignore_index: int) -> dict[str, np.ndarray]:
    """Pad every map at the bottom / right to ``size`` (image 0, mask ignore_index, valid False, other maps 0)."""
    h, w = sample["mask"].shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if not (ph or pw):
        return {k: np.ascontiguousarray(v) for k, v in sample.items()}
    fill = {"image": 0, "mask": ignore_index, "instances": 0, "valid": False}
    out = {}
    for key, value in sample.items():
        widths = ((0, ph), (0, pw)) + ((0, 0),) * (value.ndim - 2)
        out[key] = np.pad(value, widths, constant_values=fill.get(key, 0))
    return out


@dataclass(frozen=True)
class EvalProtocol:
    """How a dataset is scored: resize, whole image or sliding window, scales and flips.

    Attributes:
        mode: ``"whole"`` (one forward pass per image and scale) or ``"slide"`` (windows of ``crop_size`` every
            ``stride`` pixels, logits averaged where windows overlap; mmseg's ``slide_inference``).
        scale: ``(long, short)`` bound of a keep-ratio resize before inference (mmseg ``img_scale``); ``None`` runs
            at the stored size. Predictions are always resized back to the label's size.
        crop_size, stride: (H, W) of the windows and of their step (``"slide"`` only).
        ratios: multipliers of ``scale`` (or of the image size without one); several ratios and/or ``flip`` sum the
            softmax probabilities of every pass (mmseg's ``aug_test``), one pass takes the argmax of its logits.
        flip: also run each scale on the horizontally flipped image.
    """

    mode: str = "whole"
    scale: tuple[int, int] | None = None
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"EvalProtocol.mode must be 'whole' or 'slide', got {self.mode!r}")
        object.__setattr__(self, "scale", _pair(self.scale, "EvalProtocol.scale"))
        object.__setattr__(self, "crop_size", _pair(self.crop_size, "EvalProtocol.crop_size"))
        object.__setattr__(self, "stride", _pair(self.stride, "EvalProtocol.stride"))
        if self.mode == "slide":
            if self.crop_size is None or self.stride is None:
                raise ValueError("EvalProtocol(mode='slide') needs crop_size and stride")
            if self.stride[0] > self.crop_size[0] or self.stride[1] > self.crop_size[1]:
                raise ValueError(
                    f"EvalProtocol stride {self.stride} is larger than crop_size {self.crop_size}: pixels between "
                    "windows would never be predicted"
                )
        ratios = tuple(float(r) for r in self.ratios)
        if not ratios or any(not (r > 0 and math.isfinite(r)) for r in ratios):
            raise ValueError(f"EvalProtocol.ratios must be positive numbers, got {self.ratios!r}")
        object.__setattr__(self, "ratios", ratios)

    @property
    def is_plain(self) -> bool:
        """True when this is just ``model.predict`` at the stored size."""
        return self.mode == "whole" and self.scale is None and self.ratios == (1.0,) and not self.flip

    @property
    def num_passes(self) -> int:
        return len(self.ratios) * (2 if self.flip else 1)

    def with_mode(self, mode: str) -> EvalProtocol:
        """This protocol in a named mode: ``"whole"``, ``"slide"`` or ``"ms_flip"`` (multi-scale + flip on top of
        this protocol's single-scale mode, with :data:`MS_RATIOS`)."""
        if mode == "ms_flip":
            return replace(self, ratios=MS_RATIOS, flip=True)
        if mode == "slide" and self.crop_size is None:
            raise ValueError("this dataset has no default sliding-window crop_size / stride; give them explicitly")
        if mode not in ("whole", "slide"):
            raise ValueError(f"evaluation mode must be 'whole', 'slide' or 'ms_flip', got {mode!r}")
        return replace(self, mode=mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "scale": self.scale,
            "crop_size": self.crop_size,
            "stride": self.stride,
            "ratios": list(self.ratios),
            "flip": self.flip,
        }
