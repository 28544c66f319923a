"""Checks for user-provided (image, mask) pairs, so bad data fails loudly at load time instead of training on junk.

Rules (specs/reliability.md section 6): the image and mask have the same H x W; the mask has one channel; every
label is a class id in [0, K) or the ignore index (mmseg-style loaders silently wrap 16-bit labels, we name the
offending value instead); the image is finite and not empty; optionally a pixel-count cap against decompression
bombs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["check_sample", "describe_bad_labels"]


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:
        raise ValueError(f"{what} is not array-like ({type(x).__name__}): {exc}") from exc


def _image_hw(img: np.ndarray, channels_first: bool, where: str) -> tuple[int, int]:
    if img.ndim == 2:
        return img.shape[0], img.shape[1]
    if img.ndim != 3:
        raise ValueError(f"{where}image must be (H, W), (C, H, W) or (H, W, C); got shape {img.shape}")
    return (img.shape[1], img.shape[2]) if channels_first else (img.shape[0], img.shape[1])


def check_sample(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    source: str | None = None,
    max_pixels: int | None = None,
) -> None:
    """Raise ValueError naming the problem if (image, mask) is not a valid segmentation sample.

    Layouts: a torch image is channel-first (C, H, W); a NumPy image is channel-last (H, W, C), as image
    decoders return it; (H, W) grey images are accepted for both. The mask is (H, W); a singleton channel
    ((1, H, W) or (H, W, 1)) is accepted, more channels are not (an RGB-encoded mask must be converted first).

    Args:
        image: the image.
        mask: integer class ids.
        num_classes: K; valid labels are 0..K-1 and ignore_index.
        ignore_index: the "do not score" label.
        source: file name or sample id, prefixed to every message.
        max_pixels: optional cap on H * W.

    Raises:
        ValueError: image/mask size mismatch, a multi-channel or non-integer mask, a label outside
            [0, K) that is not ignore_index (the value is named), NaN / inf in the image, a zero-area image, or an
            image larger than max_pixels.
    """
    where = f"{source}: " if source else ""
    if num_classes < 1:
        raise ValueError(f"{where}num_classes must be >= 1, got {num_classes}")
    channels_first = isinstance(image, torch.Tensor)
    img = _to_numpy(image, f"{where}image")
    m = _to_numpy(mask, f"{where}mask")

    ih, iw = _image_hw(img, channels_first, where)
    if ih == 0 or iw == 0 or img.size == 0:
        raise ValueError(f"{where}image has zero area (shape {img.shape})")
    if max_pixels is not None and ih * iw > max_pixels:
        raise ValueError(f"{where}image has {ih * iw} pixels ({ih}x{iw}), more than the limit of {max_pixels}")
    if np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.complexfloating):
        finite = np.isfinite(img)
        if not finite.all():
            n_nan = int(np.isnan(img).sum())
            raise ValueError(f"{where}image contains {n_nan} NaN and {int((~finite).sum()) - n_nan} inf values")
    elif not (np.issubdtype(img.dtype, np.integer) or img.dtype == np.bool_):
        raise ValueError(f"{where}image must be numeric, got dtype {img.dtype}")

    if m.ndim == 3 and 1 in (m.shape[0], m.shape[-1]):
        m = m.reshape(m.shape[1:]) if m.shape[0] == 1 else m.reshape(m.shape[:-1])
    if m.ndim != 2:
        raise ValueError(
            f"{where}mask must have a single channel, (H, W); got shape {tuple(m.shape)}"
            + (" (an RGB colour mask? convert colours to class ids first)" if m.ndim == 3 else "")
        )
    if (m.shape[0], m.shape[1]) != (ih, iw):
        raise ValueError(f"{where}image is {ih}x{iw} (H x W) but mask is {m.shape[0]}x{m.shape[1]}")
    if m.dtype == np.bool_:
        return
    if np.issubdtype(m.dtype, np.floating):
        if not np.isfinite(m).all() or not (m == np.round(m)).all():
            raise ValueError(f"{where}mask must hold integer class ids, got non-integer values in a {m.dtype} mask")
    elif not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"{where}mask must hold integer class ids, got dtype {m.dtype}")
    if m.size == 0:
        return
    problem = describe_bad_labels(m, num_classes, ignore_index)
    if problem:
        raise ValueError(
            f"{where}mask holds {problem}; valid labels are 0..{num_classes - 1} and ignore_index {ignore_index}"
        )


def describe_bad_labels(labels: np.ndarray, num_classes: int, ignore_index: int | None) -> str | None:
    """``None`` if every label is in ``[0, num_classes)`` or ``ignore_index``; else a phrase naming the first bad
    value, the number of bad pixels and up to five offending values."""
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if not bad.any():
        return None
    values = np.unique(labels[bad])
    shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if values.size > 5 else "")
    return f"label {int(values[0])} ({int(bad.sum())} pixels; offending values: {shown})"
