"""Colour masks, overlay them on images and write PNG grids a person can check at a glance.

All functions take NumPy arrays or torch tensors and return NumPy ``uint8`` arrays in (H, W, 3) layout, the layout
Pillow writes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colorize", "overlay", "overlay_panoptic", "render_grid", "save_png", "to_uint8_image"]

# Ignore pixels are drawn black: no palette colour is black, so "unlabelled" never reads as a class.
IGNORE_COLOR: tuple[int, int, int] = (0, 0, 0)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def colorize(
    mask: np.ndarray | torch.Tensor,
    palette: np.ndarray | Sequence[Sequence[int]],
    ignore_index: int = 255,
    ignore_color: tuple[int, int, int] = IGNORE_COLOR,
) -> np.ndarray:
    """Map class ids to palette colours.

    Args:
        mask: (H, W) or (B, H, W) integer class ids.
        palette: (K, 3) uint8 colours, one per class.
        ignore_index: label drawn with `ignore_color`.
        ignore_color: RGB of ignore pixels.

    Returns:
        uint8 array of shape mask.shape + (3,).

    Raises:
        ValueError: a non-integer mask, a palette that is not (K, 3), or a label that is neither a class id nor
            ignore_index (the offending value is named).
    """
    m = _to_numpy(mask)
    pal = np.asarray(_to_numpy(palette))
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"palette must have shape (K, 3), got {pal.shape}")
    if m.ndim not in (2, 3):
        raise ValueError(f"mask must be (H, W) or (B, H, W), got shape {m.shape}")
    if not (np.issubdtype(m.dtype, np.integer) or m.dtype == np.bool_):
        raise ValueError(f"mask must hold integer class ids, got dtype {m.dtype}")
    m = m.astype(np.int64, copy=False)
    k = pal.shape[0]
    # Lookup table with one extra row for ignore; anything else out of range is an error, not a wrap-around.
    lut = np.concatenate([pal.astype(np.uint8), np.asarray([ignore_color], np.uint8)])
    idx = np.where(m == ignore_index, k, m)
    bad = (idx < 0) | (idx > k) | ((idx == k) & (m != ignore_index))
    if bad.any():
        value = int(m[bad].flat[0])
        raise ValueError(
            f"mask holds label {value}, which is neither a class id in [0, {k}) nor ignore_index {ignore_index}"
        )
    return lut[idx]


def to_uint8_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image in [0, 1] float ((3, H, W) or (H, W, 3)) or uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    img = _to_numpy(image)
    if img.ndim != 3:
        raise ValueError(f"image must be (3, H, W) or (H, W, 3), got shape {img.shape}")
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    if img.shape[-1] != 3:
        raise ValueError(f"image must have 3 channels, got shape {img.shape}")
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or inf")
    return np.ascontiguousarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _image_and_map(
    image: np.ndarray | torch.Tensor, label_map: np.ndarray | torch.Tensor, alpha: float, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """The checked uint8 (H, W, 3) image and (H, W) label map of an overlay."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    img = to_uint8_image(image)
    m = _to_numpy(label_map)
    if m.ndim != 2:
        raise ValueError(f"{what} must be (H, W), got shape {m.shape}")
    if m.shape != img.shape[:2]:
        raise ValueError(f"image is {img.shape[0]}x{img.shape[1]} but {what} is {m.shape[0]}x{m.shape[1]}")
    return img, m


def _blend(img: np.ndarray, colour: np.ndarray, uncoloured: np.ndarray, alpha: float) -> np.ndarray:
    """``img * (1 - alpha) + colour * alpha`` in float, the ``uncoloured`` pixels left as they are."""
    weight = np.where(uncoloured, 0.0, alpha).astype(np.float32)[..., None]
    return img.astype(np.float32) * (1 - weight) + colour.astype(np.float32) * weight


def overlay(
    image_uint8: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    palette: np.ndarray | Sequence[Sequence[int]],
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> np.ndarray:
    """Blend the colourised mask over the image; ignore pixels show the image unchanged.

    Args:
        image_uint8: (H, W, 3) uint8 (a float image in [0, 1] is converted).
        mask: (H, W) class ids.
        palette: (K, 3) colours.
        alpha: weight of the mask colour, in [0, 1].
        ignore_index: label left uncoloured.

    Returns:
        (H, W, 3) uint8.
    """
    img, m = _image_and_map(image_uint8, mask, alpha, "mask")
    out = _blend(img, colorize(m, palette, ignore_index), m == ignore_index, alpha)
    return (out + 0.5).astype(np.uint8)


def overlay_panoptic(
    image_uint8: np.ndarray | torch.Tensor,
    panoptic: np.ndarray | torch.Tensor,
    palette: np.ndarray | Sequence[Sequence[int]],
    label_divisor: int = 1000,
    alpha: float = 0.6,
) -> np.ndarray:
    """Blend a panoptic map (``class * label_divisor + instance``, negative = void) over the image.

    Each segment takes its class colour, and thing instances of one class get distinct shades of it (brightness
    and a small hue step by instance id), so touching instances stay apart; segment boundaries are drawn in black.
    Void pixels show the image unchanged. Returns (H, W, 3) uint8.
    """
    img, pan = _image_and_map(image_uint8, panoptic, alpha, "the panoptic map")
    pan = pan.astype(np.int64)
    pal = np.asarray(palette, dtype=np.float32).reshape(-1, 3)
    void = pan < 0
    classes = np.where(void, 0, pan // label_divisor)
    if classes.max(initial=0) >= len(pal):
        raise ValueError(f"panoptic id decodes to class {int(classes.max())} but the palette has {len(pal)} colours")
    instance = np.where(void, 0, pan % label_divisor)
    colour = pal[classes]
    # instance shades: brightness factors cycling around 1 and a small channel rotation for every third instance
    factors = np.asarray([1.0, 0.62, 1.35, 0.8, 1.18, 0.5, 1.5], np.float32)
    shade = np.where(instance > 0, factors[instance % len(factors)], 1.0)[..., None]
    rotated = np.roll(colour, 1, axis=-1)
    mix = np.where((instance % 3 == 2)[..., None], 0.35, 0.0).astype(np.float32)
    colour = np.clip((colour * (1 - mix) + rotated * mix) * shade, 0, 255)
    out = _blend(img, colour, void, alpha)
    edge = np.zeros(pan.shape, bool)
    edge[:-1] |= pan[:-1] != pan[1:]
    edge[:, :-1] |= pan[:, :-1] != pan[:, 1:]
    out[edge & ~void] = 0.0
    return (out + 0.5).astype(np.uint8)


def save_png(array: np.ndarray | torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (temp file + rename), creating parent folders."""
    arr = _to_numpy(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png needs uint8 data, got dtype {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"save_png needs (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"cannot save an empty image of shape {arr.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted write never leaves a truncated PNG at `path`.
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _legend(class_names: Sequence[str], palette: np.ndarray, width: int, unseen: set[int]) -> np.ndarray:
    """A strip of colour swatches with class names (unseen classes marked with '*'), wrapped to `width`."""
    font = ImageFont.load_default()
    entries = [
        (f"{name}{'*' if i in unseen else ''}", tuple(int(c) for c in palette[i])) for i, name in enumerate(class_names)
    ]
    entries.append(("ignore", IGNORE_COLOR))
    cell_w, cell_h = 96, 16
    per_row = max(1, width // cell_w)
    rows = (len(entries) + per_row - 1) // per_row
    strip = Image.new("RGB", (width, rows * cell_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for n, (name, colour) in enumerate(entries):
        x, y = (n % per_row) * cell_w + 4, (n // per_row) * cell_h + 3
        draw.rectangle([x, y, x + 11, y + 11], fill=colour, outline=(128, 128, 128))
        draw.text((x + 16, y), name, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def render_grid(
    dataset: Any,
    n: int = 16,
    columns: int = 4,
    path: str | os.PathLike = "grid.png",
    start: int = 0,
    scale: int | None = None,
    legend: bool = True,
) -> Path:
    """Write a PNG grid: for each of n samples, its image and its colourised mask side by side.

    Args:
        dataset: indexable, yielding dicts with "image" (normalised (3, H, W)) and "mask" (H, W); reads
            ``palette``, ``ignore_index``, ``mean``, ``std`` and ``class_names`` from it when present
            (a ShapesDataset has them all).
        n: number of samples (fewer if the dataset is shorter).
        columns: image/mask pairs per row.
        path: output PNG path.
        start: first dataset index.
        scale: nearest-neighbour upscaling factor; default makes each tile at least 128 px high.
        legend: append a strip naming each palette colour (unseen classes marked '*').

    Returns:
        The path written.
    """
    from .shapes import MEAN, STD, make_palette, unnormalize  # local: shapes imports nothing from here

    if n < 1 or columns < 1:
        raise ValueError(f"n and columns must be >= 1, got n={n}, columns={columns}")
    count = min(n, len(dataset) - start)
    if count < 1:
        raise ValueError(f"dataset has {len(dataset)} samples; nothing to render from index {start}")
    ignore_index = int(getattr(dataset, "ignore_index", 255))
    mean, std = getattr(dataset, "mean", MEAN), getattr(dataset, "std", STD)
    samples = [dataset[start + i] for i in range(count)]
    h, w = samples[0]["mask"].shape[-2:]
    palette = getattr(dataset, "palette", None)
    if palette is None:
        palette = make_palette(int(max(int(s["mask"][s["mask"] != ignore_index].max(initial=0)) for s in samples)) + 1)
    palette = np.asarray(palette, np.uint8)
    scale = scale or max(1, -(-128 // h))
    gap, pad = 2, 6  # gap between an image and its mask, padding between pairs
    columns = min(columns, count)
    rows = (count + columns - 1) // columns
    tile_h, tile_w = h * scale, w * scale
    pair_w = 2 * tile_w + gap
    grid = np.full((rows * (tile_h + pad) + pad, columns * (pair_w + pad) + pad, 3), 255, np.uint8)
    for i, sample in enumerate(samples):
        image = sample["image"]
        image = unnormalize(torch.as_tensor(image), mean, std)
        img = to_uint8_image(image)
        col = colorize(sample["mask"], palette, ignore_index)
        if scale > 1:
            img = img.repeat(scale, 0).repeat(scale, 1)
            col = col.repeat(scale, 0).repeat(scale, 1)
        r, c = divmod(i, columns)
        y, x = pad + r * (tile_h + pad), pad + c * (pair_w + pad)
        grid[y : y + tile_h, x : x + tile_w] = img
        grid[y : y + tile_h, x + tile_w + gap : x + pair_w] = col
    if legend and hasattr(dataset, "class_names"):
        unseen = set(getattr(dataset, "unseen_classes", ()))
        grid = np.concatenate([grid, _legend(dataset.class_names, palette, grid.shape[1], unseen)], axis=0)
    return save_png(grid, path)
