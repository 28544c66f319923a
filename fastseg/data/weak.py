"""Weak supervision on the shapes world: the WSSS label space and the captions a CLIP model trains on.

**Label space (SemPLeS / WeakTr protocol).** Weakly supervised segmentation has one background class and K
foreground classes with image-level labels. On the shapes world the thing classes (circle, square, ...) are the
foreground and every stuff texture (sky, grass, water, sand) is background: class 0 is ``"background"``, class
``1 + i`` is thing ``i``. The textures are what the co-occurrence of the world ties to each shape (a shape sits on
its preferred texture with probability ``cooccurrence``), i.e. the background that SemPLeS' prompts must learn
to keep out of a class's CAM. `WeakShapes` returns, per sample, only what training may use (the image and its
multi-hot foreground labels) plus the mapped ground-truth mask for evaluation and the official threshold sweep.

An image of the world can have no visible thing (occlusion, truncation); a WSSS image must have a positive class,
so `WeakShapes` replaces such a sample by the next index that has one (deterministic, documented in the sample's
``"index"``).

**Captions.** `caption` describes an image the way the world generated it: each visible thing with the colour
name of its pixels, and the textures it sits on ("a photo of a red circle and a green star on sand and sky.").
`caption_variants` adds the short forms ("a photo of circle.") that the CLIP prompts of SemPLeS use, so a CLIP
trained on them understands both. Existing samples are not changed.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .shapes import MEAN, STD, ShapesConfig, ShapesDataset

__all__ = ["WeakShapes", "caption", "caption_variants", "colour_name", "to_weak_mask", "weak_class_names"]

# Hue (degrees) upper bounds of the colour names; hues wrap around to red.
_HUE_NAMES = (
    (15, "red"),
    (45, "orange"),
    (70, "yellow"),
    (160, "green"),
    (200, "cyan"),
    (255, "blue"),
    (290, "purple"),
    (335, "pink"),
    (360, "red"),
)


def weak_class_names(config: ShapesConfig | None = None) -> tuple[str, ...]:
    """``("background", *thing_classes)``: the WSSS class list of the world."""
    config = config or ShapesConfig()
    return ("background",) + tuple(config.thing_classes)


def to_weak_mask(mask: torch.Tensor, config: ShapesConfig | None = None) -> torch.Tensor:
    """World class ids -> WSSS ids: every stuff texture -> 0, thing ``S + i`` -> ``1 + i``; ignore stays."""
    config = config or ShapesConfig()
    stuff = len(config.stuff_classes)
    out = torch.where(mask < stuff, torch.zeros_like(mask), mask - stuff + 1)
    return torch.where(mask == config.ignore_index, mask, out)


def colour_name(rgb: np.ndarray) -> str:
    """A plain colour word for an RGB triple in [0, 1] (white / grey / black for unsaturated colours)."""
    hue, sat, val = colorsys.rgb_to_hsv(*(float(c) for c in np.clip(rgb, 0, 1)))
    if val < 0.2:
        return "black"
    if sat < 0.25:
        return "white" if val > 0.75 else "grey"
    degrees = hue * 360
    return next(name for bound, name in _HUE_NAMES if degrees < bound)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _describe(sample: dict[str, Any], config: ShapesConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """``[(colour, thing name)]`` of the visible things in paint order and the textures by area (largest first)."""
    mask, instances = sample["mask"].numpy(), sample["instances"].numpy()
    image = (
        sample["image"].numpy() * np.asarray(STD, np.float32)[:, None, None]
        + np.asarray(MEAN, np.float32)[:, None, None]
    )
    names = config.class_names
    things = []
    for inst, cls in enumerate(sample["instance_classes"].tolist(), start=1):
        pixels = (instances == inst) & (mask == cls)
        if cls < 0 or not pixels.any():
            continue
        things.append((colour_name(image[:, pixels].mean(1)), names[cls]))
    areas = np.bincount(mask[mask < len(config.stuff_classes)].ravel(), minlength=len(config.stuff_classes))
    textures = [names[i] for i in np.argsort(-areas, kind="stable") if areas[i] > 0]
    return things, textures


def caption(sample: dict[str, Any], config: ShapesConfig | None = None) -> str:
    """The full caption of a world sample: things with colours, then the textures they sit on."""
    config = config or ShapesConfig()
    things, textures = _describe(sample, config)
    parts = [f"a {colour} {name}" for colour, name in things]
    text = "a photo of " + (_join(parts) if parts else "nothing")
    if textures:
        text += " on " + _join(textures)
    return text + "."


def caption_variants(sample: dict[str, Any], config: ShapesConfig | None = None) -> list[str]:
    """The full caption plus short forms: one per visible thing class and per texture ("a photo of circle.")."""
    config = config or ShapesConfig()
    things, textures = _describe(sample, config)
    short = sorted({name for _, name in things}) + textures
    return [caption(sample, config)] + [f"a photo of {name}." for name in short]


class WeakShapes(Dataset):
    """The shapes world in the WSSS label space (see the module docstring).

    Each sample: ``image`` (3, H, W) normalised; ``image_labels`` (K,) float multi-hot of the foreground classes
    present (K = number of thing classes; never all zero); ``index`` the world index drawn (the requested one, or
    the next with a visible thing); with ``with_masks=True`` (evaluation only) also ``mask`` (H, W) in WSSS ids.
    Training sets leave the masks out so that no pixel label can reach a weakly supervised loss.
    """

    def __init__(
        self,
        split: str = "train",
        length: int | None = None,
        config: ShapesConfig | None = None,
        seed: int = 0,
        with_masks: bool = False,
    ) -> None:
        self.with_masks = with_masks
        self.split, self.seed = split, seed
        self.world = ShapesDataset(split, length=length, config=config, seed=seed)
        self.config = self.world.config
        if not self.config.thing_classes:
            raise ValueError("WeakShapes needs a world with thing classes (they are the foreground classes)")
        self.class_names = weak_class_names(self.config)
        self.num_classes = len(self.class_names)
        self.ignore_index = self.config.ignore_index

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, j: int) -> dict[str, Any]:
        n = len(self.world)
        if not -n <= j < n:
            raise IndexError(f"index {j} out of range for WeakShapes of length {n}")
        stuff = len(self.config.stuff_classes)
        for step in range(n):
            index = (j + step) % n
            sample = self.world[index]
            fg = sample["image_labels"][stuff:]
            if bool(fg.any()):
                out = {"image": sample["image"], "image_labels": fg.clone(), "index": index}
                if self.with_masks:
                    out["mask"] = to_weak_mask(sample["mask"], self.config)
                return out
        raise ValueError("no image of this world has a visible thing: nothing to train a WSSS model on")
