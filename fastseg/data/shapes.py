"""The built-in synthetic world: textured stuff backgrounds with shaped things on top.

Every method in fastseg trains and is judged on this world on a CPU in minutes, so it carries every kind of
supervision the five methods need from one generator:

* **semantic masks** (``"mask"``): stuff classes (sky / grass / water / sand textures) and thing classes (circle,
  square, triangle, star, ring, cross, ellipse, diamond), with ``ignore_index`` on a thin band around each thing
  where the anti-aliased edge makes the label ambiguous;
* **instances** (``"instances"``): panoptic-style ids, 0 for stuff, 1..n for things in paint order, and
  ``"instance_classes"`` giving the class of each id; with ``panoptic=True`` also ``"panoptic"``, the map in the
  common ``class_id * LABEL_DIVISOR + instance_id`` encoding (stuff: instance 0; ignore pixels: ``VOID`` = -1),
  written as COCO panoptic / instance files by `fastseg.data.coco`;
* **image-level labels** (``"image_labels"``): multi-hot of the classes present in the mask (weak supervision);
* **labelled / unlabelled subsets** of the train split by fraction (semi-supervision); the unlabelled subset still
  carries its masks for evaluation, with ``"labelled"`` False saying they must not be trained on;
* **seen / unseen classes** with plain-English names (zero-shot; text embeddings are made from the names), and an
  ``unseen`` mode that either keeps, ignores or never draws the unseen classes (the ZSS and ZSP training protocols);
  `zero_shot_config` adds a fifth texture (snow) as an unseen *stuff* class next to the two unseen things;
* **class-dependent co-occurrence**: each thing class prefers one stuff texture and sits on it with probability
  ``cooccurrence`` (0.8 by default, chance is 1/4), the spurious background correlation SemPLeS must suppress.

Determinism: a sample depends only on ``(seed, split, index)`` and the config. It is drawn from its own
``numpy.random.Generator`` seeded with ``SeedSequence([seed, split_id, index])``: no global RNG is read or moved,
DataLoader workers need no seeding, and the three splits draw from disjoint streams. ``length`` only bounds the
index, so a dataset of a billion samples costs nothing until read.

Images are learnable but not trivial: textures carry noise, low-frequency variation and per-image colour; thing
colours are drawn from class-dependent hue ranges that overlap their neighbours' (colour alone does not give the
class, shape does); things are shaded, anti-aliased (2x2 supersampling), rotated, truncated by the border and
occlude each other; a mild global brightness / contrast / white-balance jitter and sensor noise go on top.
Generation is vectorised NumPy on the bounding box of each thing; see ``benchmark_generation``.
"""

from __future__ import annotations

import colorsys
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import default_palette

__all__ = [
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "LABEL_DIVISOR",
    "MEAN",
    "PALETTE",
    "SEEN_CLASSES",
    "STD",
    "STUFF_CLASSES",
    "THING_CLASSES",
    "UNSEEN_CLASSES",
    "VOID",
    "ShapesConfig",
    "ShapesDataset",
    "benchmark_generation",
    "make_palette",
    "panoptic_map",
    "pretrained_cfg_fields",
    "unnormalize",
    "zero_shot_config",
]

# Every texture and shape the renderer knows. A config picks a subset (in any order) as its class list. "snow" is
# the optional fifth texture (zero-shot unseen stuff); the default world keeps the first four.
KNOWN_STUFF: tuple[str, ...] = ("sky", "grass", "water", "sand", "snow")
DEFAULT_STUFF: tuple[str, ...] = KNOWN_STUFF[:4]
KNOWN_THINGS: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "ellipse", "diamond")

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS: dict[str, int] = {"train": 4096, "val": 512, "test": 512}

# Per-channel statistics of the default world (measured over 4096 train images of 64x64 with
# `estimate_mean_std`); other configs reuse them, which is close enough for normalisation.
MEAN: tuple[float, float, float] = (0.450, 0.571, 0.495)
STD: tuple[float, float, float] = (0.276, 0.172, 0.260)
IGNORE_INDEX = 255
LABEL_DIVISOR = 1000  # panoptic id = class_id * LABEL_DIVISOR + instance_id
VOID = -1  # panoptic id of ignore pixels

# Hand-picked, mutually distinct colours for the default 12 classes (stuff first, then things); further
# classes get golden-ratio hues from `make_palette`.
_BASE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (70, 130, 220),  # sky: blue
    (60, 160, 60),  # grass: green
    (0, 90, 110),  # water: dark teal
    (220, 190, 120),  # sand: beige
    (230, 25, 75),  # circle: red
    (255, 225, 25),  # square: yellow
    (245, 130, 48),  # triangle: orange
    (145, 30, 180),  # star: purple
    (70, 240, 240),  # ring: cyan
    (240, 50, 230),  # cross: magenta
    (128, 0, 0),  # ellipse: maroon
    (250, 250, 250),  # diamond: white
)


def make_palette(num_classes: int) -> np.ndarray:
    """The shapes world's visualisation colours, (K, 3) uint8: the 12 hand-picked ones, then
    `fastseg.registry.default_palette`'s (the one palette function) for further classes."""
    return np.asarray(default_palette(num_classes, _BASE_PALETTE), dtype=np.uint8).reshape(num_classes, 3)


@dataclass(frozen=True)
class ShapesConfig:
    """What the synthetic world looks like. Frozen (hashable), so it can key caches and live in checkpoints.

    Attributes:
        image_size: int (square) or (H, W); stored as an (H, W) tuple.
        stuff_classes: texture names (subset of ``KNOWN_STUFF``); they take class ids 0..S-1. There is no
            "background" class: every pixel that is not a thing is a named texture.
        thing_classes: shape names (subset of ``KNOWN_THINGS``); they take ids S..K-1.
        unseen_classes: names of the zero-shot unseen classes (any class; the default has two thing classes).
        min_instances, max_instances: things drawn per image (before occlusion may hide some).
        ignore_index: label of ambiguous pixels; must not be a class id.
        boundary_width: half-width in pixels of the ignore band around each thing (0 disables it); a pixel is in
            the band when a pixel of another instance (or of stuff) lies within this Chebyshev distance.
        min_visible_pixels: a thing with fewer labelled (non-band) pixels left after occlusion is too small to
            name, so all its pixels become ignore_index and it gets no instance id.
        cooccurrence: probability that a thing is drawn from the classes preferring the image's main stuff
            texture (with 4 stuff classes and 2 things per texture, chance is 0.25).
        preferred_stuff: (thing, stuff) pairs; None assigns thing i to stuff i % S.
        second_stuff_prob: probability that a second texture covers 20-40 % of the image from one side.
        scale_range: thing outer radius as a fraction of min(H, W).
        hue_width: half-width of each thing class's hue range; class hue centres are 1/T apart, so a width above
            1/(2T) makes neighbouring classes share colours and only the shape tells them apart.
        occlusion_prob: probability that a thing is placed overlapping an earlier one.
        brightness, contrast: global jitter ranges (+-brightness, 1 +- contrast).
        noise_std: per-pixel Gaussian sensor noise added to the [0, 1] image.
    """

    image_size: int | tuple[int, int] = 64
    stuff_classes: tuple[str, ...] = DEFAULT_STUFF
    thing_classes: tuple[str, ...] = KNOWN_THINGS
    unseen_classes: tuple[str, ...] = ("ellipse", "diamond")
    min_instances: int = 1
    max_instances: int = 5
    ignore_index: int = IGNORE_INDEX
    boundary_width: int = 1
    min_visible_pixels: int = 6
    cooccurrence: float = 0.8
    preferred_stuff: tuple[tuple[str, str], ...] | None = None
    second_stuff_prob: float = 0.4
    scale_range: tuple[float, float] = (0.11, 0.22)
    hue_width: float = 0.15
    occlusion_prob: float = 0.3
    brightness: float = 0.06
    contrast: float = 0.15
    noise_std: float = 0.02

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"image_size must be an int or (H, W) with both sides >= 8, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        for attr in ("stuff_classes", "thing_classes", "unseen_classes"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        unknown = [s for s in self.stuff_classes if s not in KNOWN_STUFF]
        if unknown or not self.stuff_classes:
            raise ValueError(f"stuff_classes must be a non-empty subset of {KNOWN_STUFF}; unknown: {unknown}")
        unknown = [t for t in self.thing_classes if t not in KNOWN_THINGS]
        if unknown:
            raise ValueError(f"thing_classes must be a subset of {KNOWN_THINGS}; unknown: {unknown}")
        names = self.stuff_classes + self.thing_classes
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        unknown = [u for u in self.unseen_classes if u not in names]
        if unknown:
            raise ValueError(f"unseen_classes {unknown} are not among the classes {names}")
        if not 0 <= self.min_instances <= self.max_instances:
            raise ValueError(
                f"need 0 <= min_instances <= max_instances, got {self.min_instances}, {self.max_instances}"
            )
        if self.max_instances > 0 and not self.thing_classes:
            raise ValueError("max_instances > 0 needs at least one thing class")
        if 0 <= self.ignore_index < len(names):
            raise ValueError(f"ignore_index {self.ignore_index} collides with a class id (0..{len(names) - 1})")
        if self.boundary_width < 0 or self.min_visible_pixels < 0:
            raise ValueError("boundary_width and min_visible_pixels must be >= 0")
        for attr in ("cooccurrence", "second_stuff_prob", "occlusion_prob"):
            if not 0.0 <= getattr(self, attr) <= 1.0:
                raise ValueError(f"{attr} must lie in [0, 1], got {getattr(self, attr)}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi <= 1, got {self.scale_range}")
        if self.preferred_stuff is not None:
            pairs = tuple(tuple(p) for p in self.preferred_stuff)
            object.__setattr__(self, "preferred_stuff", pairs)
            for thing, stuff in pairs:
                if thing not in self.thing_classes or stuff not in self.stuff_classes:
                    raise ValueError(f"preferred_stuff pair ({thing!r}, {stuff!r}) names an unknown class")

    # Derived views. Class ids: stuff 0..S-1 in the given order, then things.
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.stuff_classes + self.thing_classes

    @property
    def num_classes(self) -> int:
        return len(self.stuff_classes) + len(self.thing_classes)

    @property
    def stuff_ids(self) -> tuple[int, ...]:
        return tuple(range(len(self.stuff_classes)))

    @property
    def thing_ids(self) -> tuple[int, ...]:
        return tuple(range(len(self.stuff_classes), self.num_classes))

    @property
    def unseen_ids(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.class_names) if n in self.unseen_classes)

    @property
    def seen_ids(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.class_names) if n not in self.unseen_classes)

    @property
    def preferred_stuff_ids(self) -> dict[int, int]:
        """Thing class id -> id of the stuff class it prefers to sit on."""
        explicit = dict(self.preferred_stuff or ())
        out = {}
        for i, thing in enumerate(self.thing_classes):
            stuff = explicit.get(thing, self.stuff_classes[i % len(self.stuff_classes)])
            out[len(self.stuff_classes) + i] = self.stuff_classes.index(stuff)
        return out

    @property
    def palette(self) -> np.ndarray:
        return make_palette(self.num_classes)


_DEFAULT = ShapesConfig()
CLASS_NAMES: tuple[str, ...] = _DEFAULT.class_names
STUFF_CLASSES: tuple[int, ...] = _DEFAULT.stuff_ids
THING_CLASSES: tuple[int, ...] = _DEFAULT.thing_ids
SEEN_CLASSES: tuple[int, ...] = _DEFAULT.seen_ids
UNSEEN_CLASSES: tuple[int, ...] = _DEFAULT.unseen_ids
PALETTE: np.ndarray = _DEFAULT.palette


def unnormalize(image: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """Undo the dataset normalisation: (..., 3, H, W) normalised -> the same shape, float in [0, 1]."""
    if image.ndim < 3 or image.shape[-3] != len(mean):
        raise ValueError(f"expected (..., {len(mean)}, H, W) images, got shape {tuple(image.shape)}")
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image * s + m).clamp(0.0, 1.0)


def pretrained_cfg_fields(config: ShapesConfig = _DEFAULT) -> dict[str, Any]:
    """What a model trained on this world should remember (read by the registry's PretrainedCfg)."""
    h, w = config.image_size
    return {
        "class_names": list(config.class_names),
        "num_classes": config.num_classes,
        "palette": config.palette.tolist(),
        "mean": list(MEAN),
        "std": list(STD),
        "ignore_index": config.ignore_index,
        "input_size": (3, h, w),
        "stuff_classes": list(config.stuff_ids),
        "thing_classes": list(config.thing_ids),
        "seen_classes": list(config.seen_ids),
        "unseen_classes": list(config.unseen_ids),
        "label_divisor": LABEL_DIVISOR,
    }


def zero_shot_config(**overrides: Any) -> ShapesConfig:
    """The world with a fifth texture (snow) as unseen stuff beside the unseen things ellipse and diamond, so
    zero-shot panoptic covers stuff as well as things (class ids: 5 stuff, then 8 things)."""
    fields: dict[str, Any] = {"stuff_classes": KNOWN_STUFF, "unseen_classes": ("snow", "ellipse", "diamond")}
    fields.update(overrides)
    return ShapesConfig(**fields)


def panoptic_map(
    mask: np.ndarray | torch.Tensor,
    instances: np.ndarray | torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_divisor: int = LABEL_DIVISOR,
) -> np.ndarray | torch.Tensor:
    """``class_id * label_divisor + instance_id`` from a sample's ``mask`` and ``instances`` (same type out).

    Stuff pixels have instance 0, so a stuff class is one segment per image; ``ignore_index`` pixels (the boundary
    band, unnameable slivers, unseen classes in ``unseen="ignore"`` mode) become ``VOID`` (-1).
    """
    if tuple(mask.shape) != tuple(instances.shape):
        raise ValueError(f"mask {tuple(mask.shape)} and instances {tuple(instances.shape)} differ in shape")
    pan = mask * label_divisor + instances
    void = mask == ignore_index
    if isinstance(pan, torch.Tensor):
        return pan.masked_fill(void, VOID)
    pan[void] = VOID
    return pan


# ----------------------------------------------------------------------------------------------------------------
# Rendering helpers (all NumPy, float32 images in [0, 1], (H, W, 3)).


@functools.lru_cache(maxsize=64)
def _upsample_matrix(out_size: int, grid: int) -> np.ndarray:
    """(out_size, grid) bilinear interpolation weights (align_corners=False), so noise upsampling is one GEMM."""
    pos = np.clip((np.arange(out_size) + 0.5) * grid / out_size - 0.5, 0, grid - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, grid - 1)
    frac = (pos - lo).astype(np.float32)
    mat = np.zeros((out_size, grid), np.float32)
    rows = np.arange(out_size)
    mat[rows, lo] += 1 - frac
    mat[rows, hi] += frac
    return mat


def _lowfreq(rng: _Draws, h: int, w: int, grid: int) -> np.ndarray:
    """Smooth noise: a grid x grid standard normal field upsampled bilinearly to (h, w)."""
    return _upsample_matrix(h, grid) @ rng.normal(grid, grid) @ _upsample_matrix_t(w, grid)


@functools.lru_cache(maxsize=64)
def _upsample_matrix_t(out_size: int, grid: int) -> np.ndarray:
    """Contiguous transpose of `_upsample_matrix` (a strided right operand takes a slower GEMM path)."""
    return np.ascontiguousarray(_upsample_matrix(out_size, grid).T)


@functools.lru_cache(maxsize=16)
def _pixel_coords(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (n,) and 2x supersampling positions (2n,) along one axis (offsets 0.25 and 0.75)."""
    centres = np.arange(n, dtype=np.float32) + 0.5
    sub = (np.arange(n, dtype=np.float32)[:, None] + np.array([0.25, 0.75], np.float32)).reshape(-1)
    centres.flags.writeable = False
    sub.flags.writeable = False
    return centres, sub


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One colour as a (3, 1, 1) float32 array, ready to broadcast over a (3, H, W) image."""
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32).reshape(3, 1, 1)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.arange(h, dtype=np.float32)[:, None],
        np.arange(w, dtype=np.float32)[None, :],
    )


_NOISE_BANK_SIZE = 1 << 20


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """1M fixed standard normals (own seed, read-only). Slicing it at a random offset is ~10x cheaper than drawing
    fresh normals, which dominated generation time; the offset keeps samples independent for all practical use."""
    bank = np.random.Generator(np.random.PCG64(0x5EED5)).standard_normal(_NOISE_BANK_SIZE, dtype=np.float32)
    bank.flags.writeable = False
    return bank


class _Draws:
    """All the randomness of one sample, from its private generator.

    Scalar draws come from one vectorised batch of uniforms (a scalar ``Generator.uniform`` call costs
    microseconds, and a sample makes ~100 of them); noise fields are slices of the fixed noise bank.
    """

    __slots__ = ("_i", "_rng", "_u")

    def __init__(self, rng: np.random.Generator, n: int = 160) -> None:
        self._rng = rng
        self._u: list[float] = rng.random(n).tolist()
        self._i = 0

    def random(self) -> float:
        if self._i >= len(self._u):
            self._u.extend(self._rng.random(64).tolist())
        x = self._u[self._i]
        self._i += 1
        return x

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def integers(self, n: int) -> int:
        return min(int(self.random() * n), n - 1)

    def normal(self, *shape: int) -> np.ndarray:
        """Standard normal field of the given shape (a read-only view: never modify it in place)."""
        size = math.prod(shape)
        bank = _noise_bank()
        if 2 * size > bank.size:  # very large images: fresh draws
            return self._rng.standard_normal(shape, dtype=np.float32)
        off = self.integers(bank.size - size + 1)
        return bank[off : off + size].reshape(shape)


# Textures and images are channel-first (3, H, W): NumPy broadcasting over a trailing axis of 3 runs ~10x slower
# than over rows of W pixels.


def _texture_sky(rng: _Draws, h: int, w: int) -> np.ndarray:
    hue = rng.uniform(0.55, 0.63)
    top = _hsv(hue, rng.uniform(0.55, 0.85), rng.uniform(0.6, 0.85))
    bottom = _hsv(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.15, 0.4), rng.uniform(0.85, 1.0))
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[None, :, None]
    gradient = top * (1 - t) + bottom * t  # (3, H, 1): lighter towards the horizon
    clouds = np.clip((_lowfreq(rng, h, w, 5) - rng.uniform(0.0, 0.6)) * 1.5, 0, 1) * rng.uniform(0.5, 0.9)
    return gradient + (0.97 - gradient) * clouds + rng.normal(1, h, w) * 0.01


def _texture_grass(rng: _Draws, h: int, w: int) -> np.ndarray:
    base = _hsv(rng.uniform(0.21, 0.34), rng.uniform(0.5, 0.85), rng.uniform(0.35, 0.6))
    # Blades: noise that is fine across x but stretched along y gives vertical streaks.
    gh = max(2, h // 5)
    streaks = _upsample_matrix(h, gh) @ rng.normal(gh, w)
    shade = 1 + 0.2 * streaks + 0.12 * _lowfreq(rng, h, w, 4)
    img = base * shade
    img[0] += 0.06 * _lowfreq(rng, h, w, 3)  # yellowish / dry patches
    return img + rng.normal(1, h, w) * 0.03


def _texture_water(rng: _Draws, h: int, w: int) -> np.ndarray:
    base = _hsv(rng.uniform(0.47, 0.55), rng.uniform(0.55, 0.9), rng.uniform(0.4, 0.65))
    scale = min(h, w) / 64.0
    wavelength = rng.uniform(5.0, 9.0) * scale
    ys, xs = _grid(h, w)
    bend = 0.3 * np.sin(2 * np.pi * xs / (wavelength * rng.uniform(3, 5)) + rng.uniform(0, 6.3))
    waves = np.sin(2 * np.pi * (ys / wavelength + bend) + rng.uniform(0, 6.3))
    shade = 1 + 0.15 * waves + 0.1 * _lowfreq(rng, h, w, 4)
    glint = np.clip((waves - 0.85) / 0.15, 0, 1) * 0.35  # specular highlights on the crests
    img = base * shade
    img += (1 - img) * glint
    return img + rng.normal(1, h, w) * 0.02


def _texture_sand(rng: _Draws, h: int, w: int) -> np.ndarray:
    base = _hsv(rng.uniform(0.08, 0.13), rng.uniform(0.3, 0.55), rng.uniform(0.7, 0.9))
    scale = min(h, w) / 64.0
    angle = rng.uniform(0, np.pi)
    ys, xs = _grid(h, w)
    ripples = np.sin(
        2 * np.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / (rng.uniform(8, 14) * scale)
        + 1.5 * _lowfreq(rng, h, w, 3)
    )
    grain = rng.normal(h, w) * 0.06
    speckles = rng.normal(h, w) > 1.75  # ~4 % of the pixels are darker grains
    shade = 1 + 0.07 * ripples + grain - 0.25 * speckles
    return base * shade


def _texture_snow(rng: _Draws, h: int, w: int) -> np.ndarray:
    base = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.03, 0.12), rng.uniform(0.85, 0.97))
    # Wind-blown drifts (low frequency, blue-grey shadows) and fine crystalline grain with sparkles.
    drifts = _lowfreq(rng, h, w, 4)
    shade = 1 - 0.07 * np.clip(drifts, 0, None) + 0.025 * rng.normal(h, w)
    img = base * shade
    img[2] += 0.03 * np.clip(-drifts, 0, None)  # bluish hollows
    sparkle = rng.normal(h, w) > 2.2
    return img + 0.12 * sparkle


_TEXTURES: dict[str, Callable[[_Draws, int, int], np.ndarray]] = {
    "snow": _texture_snow,
    "sky": _texture_sky,
    "grass": _texture_grass,
    "water": _texture_water,
    "sand": _texture_sand,
}


def _shape_params(name: str, rng: _Draws) -> dict[str, float]:
    """Per-instance shape parameters; the random aspect ratios keep ellipse != circle and diamond != square."""
    if name == "ring":
        return {"inner": rng.uniform(0.45, 0.6)}
    if name == "cross":
        return {"arm": rng.uniform(0.26, 0.36)}
    if name == "ellipse":
        return {"aspect": rng.uniform(0.42, 0.6)}
    if name == "diamond":
        return {"aspect": rng.uniform(0.5, 0.65)}
    if name == "star":
        return {"inner": rng.uniform(0.4, 0.5)}
    return {}


def _inside(name: str, u: np.ndarray, v: np.ndarray, r: float, p: dict[str, float]) -> np.ndarray:
    """Inside test in the shape's own frame (u, v); r is the outer radius."""
    if name == "circle":
        return u * u + v * v <= (0.85 * r) ** 2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72 * r
    if name == "triangle":
        # Equilateral with circumradius r: three half-planes at inradius r/2.
        angles = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6], np.float32)[:, None, None]
        return (u * np.cos(angles) + v * np.sin(angles)).max(axis=0) <= 0.5 * r
    if name == "star":
        # Fold the angle into one half-spike; inside iff on the origin side of the tip -> inner-vertex edge.
        sector = 2 * np.pi / 5
        rho = np.sqrt(u * u + v * v)
        phi = np.abs(np.mod(np.arctan2(v, u), sector) - sector / 2)
        qx, qy = rho * np.cos(phi), rho * np.sin(phi)
        ri = p["inner"] * r
        ix, iy = ri * math.cos(sector / 2), ri * math.sin(sector / 2)
        return (ix - r) * qy - iy * (qx - r) >= 0
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= (0.9 * r) ** 2) & (d2 >= (p["inner"] * 0.9 * r) ** 2)
    if name == "cross":
        a, b = np.abs(u), np.abs(v)
        arm = p["arm"] * r
        return ((a <= arm) & (b <= 0.9 * r)) | ((b <= arm) & (a <= 0.9 * r))
    if name == "ellipse":
        return (u / r) ** 2 + (v / (p["aspect"] * r)) ** 2 <= 1
    if name == "diamond":
        return np.abs(u) / r + np.abs(v) / (p["aspect"] * r) <= 1
    raise ValueError(f"unknown shape {name!r}")


def _chebyshev_band(instances: np.ndarray, width: int) -> np.ndarray:
    """Pixels with a different instance id (0 = stuff) within Chebyshev distance `width`: max != min filter.

    The window is clipped at the image border (no padding), and the filter is separable: rows, then columns.
    """
    if width == 0:
        return np.zeros(instances.shape, bool)
    hi = instances.copy()
    lo = instances.copy()
    for axis in (1, 0):
        src_hi, src_lo = hi.copy(), lo.copy()
        for d in range(1, width + 1):
            if d >= instances.shape[axis]:
                break
            head = (slice(None), slice(d, None)) if axis == 1 else (slice(d, None), slice(None))
            tail = (slice(None), slice(None, -d)) if axis == 1 else (slice(None, -d), slice(None))
            # Neighbour d to the left / above, then to the right / below.
            np.maximum(hi[head], src_hi[tail], out=hi[head])
            np.minimum(lo[head], src_lo[tail], out=lo[head])
            np.maximum(hi[tail], src_hi[head], out=hi[tail])
            np.minimum(lo[tail], src_lo[head], out=lo[tail])
    return hi != lo


# ----------------------------------------------------------------------------------------------------------------
# The dataset.


class ShapesDataset(Dataset):
    """Seeded, index-addressable synthetic segmentation dataset (see the module docstring).

    Args:
        split: "train", "val" or "test"; the three draw from disjoint random streams.
        length: number of samples (only bounds the index; huge values cost nothing). Default: 4096 for train,
            512 for val and test.
        config: the world's parameters.
        seed: base seed; a sample is a pure function of (seed, split, index, config).
        subset: None for the whole split, or "labelled" / "unlabelled" to address only that part of the train
            split. Index j of a subset maps to a train index; ``"index"`` in the sample is the train index.
        labelled_fraction: fraction of train indices that are labelled. The partition is deterministic and spread
            evenly over the indices (index i is labelled iff floor((i + 1) f) > floor(i f)), so exactly
            floor(length * f) of the first ``length`` train indices are labelled, for any length.
        transform: optional callable applied to the sample dict before it is returned.
        unseen: "keep" (default) labels unseen classes normally (evaluation); "ignore" turns their pixels into
            ignore_index and drops their instances and image labels (zero-shot semantic training: only seen
            labels); "exclude" never draws unseen classes (zero-shot panoptic training, where images containing
            an unseen class are dropped).
        panoptic: also return ``"panoptic"`` (see below). Off by default: existing samples stay as they were.

    Each sample is a dict:
        image: float32 (3, H, W), normalised with MEAN / STD.
        mask: int64 (H, W), class ids, ignore_index on the boundary band and on unnameable slivers.
        instances: int64 (H, W), 0 for stuff, 1..n for things (band pixels of a thing keep its id).
        instance_classes: int64 (max_instances,), class of instance i at position i - 1, -1 padding.
        image_labels: float32 (K,), multi-hot of the classes present in mask.
        labelled: bool scalar tensor; False means the mask is for evaluation only and must not be trained on.
        index: int, the sample's index within its split.
        panoptic: int64 (H, W), only with ``panoptic=True``: ``class_id * LABEL_DIVISOR + instance_id``, -1 (VOID)
            on ignore pixels (`panoptic_map`).
    """

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        length: int | None = None,
        config: ShapesConfig | None = None,
        seed: int = 0,
        subset: Literal["labelled", "unlabelled"] | None = None,
        labelled_fraction: float = 1.0,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        unseen: Literal["keep", "ignore", "exclude"] = "keep",
        panoptic: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if subset not in (None, "labelled", "unlabelled"):
            raise ValueError(f"subset must be None, 'labelled' or 'unlabelled', got {subset!r}")
        if subset is not None and split != "train":
            raise ValueError(f"labelled / unlabelled subsets exist only for split='train', got split={split!r}")
        if not 0.0 <= labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must lie in [0, 1], got {labelled_fraction}")
        if unseen not in ("keep", "ignore", "exclude"):
            raise ValueError(f"unseen must be 'keep', 'ignore' or 'exclude', got {unseen!r}")
        length = DEFAULT_LENGTHS[split] if length is None else int(length)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        self.split = split
        self.split_length = length
        self.config = config if config is not None else ShapesConfig()
        self.seed = int(seed)
        self.subset = subset
        self.labelled_fraction = float(labelled_fraction)
        # Exact rational arithmetic for the partition, so 0.1 * 10 labels exactly 1 sample and not 0.
        self._fraction = Fraction(labelled_fraction).limit_denominator(1_000_000)
        self.transform = transform
        self.unseen = unseen
        self.panoptic = bool(panoptic)
        if self.panoptic and self.config.max_instances >= LABEL_DIVISOR:
            raise ValueError(
                f"panoptic ids need max_instances < LABEL_DIVISOR ({LABEL_DIVISOR}), got {self.config.max_instances}"
            )
        self.label_divisor = LABEL_DIVISOR

        cfg = self.config
        self.class_names = cfg.class_names
        self.num_classes = cfg.num_classes
        self.stuff_classes = cfg.stuff_ids
        self.thing_classes = cfg.thing_ids
        self.seen_classes = cfg.seen_ids
        self.unseen_classes = cfg.unseen_ids
        self.palette = cfg.palette
        self.ignore_index = cfg.ignore_index
        self.mean = MEAN
        self.std = STD
        self._preferred = cfg.preferred_stuff_ids
        self._mean = np.asarray(MEAN, np.float32).reshape(3, 1, 1)
        self._inv_std = (1.0 / np.asarray(STD, np.float32)).reshape(3, 1, 1)
        # Thing hue centres: evenly spaced over the known shapes so a class keeps its colours across configs.
        self._hue_centre = {
            tid: KNOWN_THINGS.index(name) / len(KNOWN_THINGS) for tid, name in zip(cfg.thing_ids, cfg.thing_classes)
        }
        excluded = set(cfg.unseen_ids) if unseen == "exclude" else set()
        self._stuff_pool = [s for s in cfg.stuff_ids if s not in excluded]
        self._thing_pool = [t for t in cfg.thing_ids if t not in excluded]
        if not self._stuff_pool:
            raise ValueError("unseen='exclude' leaves no stuff class to draw the background from")
        if not self._thing_pool and cfg.min_instances > 0:
            raise ValueError("unseen='exclude' leaves no thing class, but min_instances > 0")

        if subset is None:
            self._length = length
        else:
            n_lab = self._num_labelled(length)
            self._length = n_lab if subset == "labelled" else length - n_lab

    # -- labelled / unlabelled partition -------------------------------------------------------------------------

    def _num_labelled(self, n: int) -> int:
        """Labelled count among train indices [0, n): floor(n * f)."""
        f = self._fraction
        return n * f.numerator // f.denominator

    def is_labelled(self, index: int) -> bool:
        """Whether train index `index` belongs to the labelled part (always True for val / test)."""
        if self.split != "train":
            return True
        return self._num_labelled(index + 1) > self._num_labelled(index)

    def _subset_to_split_index(self, j: int) -> int:
        """The j-th index of the subset -> its train index, by binary search on the monotone count."""
        if self.subset is None:
            return j
        want_labelled = self.subset == "labelled"

        def count(n: int) -> int:  # subset members among [0, n)
            lab = self._num_labelled(n)
            return lab if want_labelled else n - lab

        lo, hi = 0, self.split_length  # smallest n with count(n) >= j + 1; the answer is n - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if count(mid) >= j + 1:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1

    def split_indices(self) -> range | list[int]:
        """The split indices this dataset addresses, in order (materialises a list for subsets)."""
        if self.subset is None:
            return range(self._length)
        return [self._subset_to_split_index(j) for j in range(self._length)]

    # -- Dataset protocol ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, j: int) -> dict[str, Any]:
        j = int(j)
        if j < 0:
            j += self._length
        if not 0 <= j < self._length:
            raise IndexError(f"index {j} out of range for a ShapesDataset of length {self._length}")
        index = self._subset_to_split_index(j)
        sample = self.generate(index)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def __repr__(self) -> str:
        h, w = self.config.image_size
        return (
            f"ShapesDataset(split={self.split!r}, len={self._length}, size={h}x{w}, classes={self.num_classes}, "
            f"seed={self.seed}, subset={self.subset!r}, labelled_fraction={self.labelled_fraction}, "
            f"unseen={self.unseen!r})"
        )

    def pretrained_cfg_fields(self) -> dict[str, Any]:
        """See the module-level `pretrained_cfg_fields`."""
        return pretrained_cfg_fields(self.config)

    # -- generation -------------------------------------------------------------------------------------------------

    def rng_for(self, index: int) -> np.random.Generator:
        """The private generator of sample `index` of this split (no global RNG involved)."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, SPLITS[self.split], index])))

    def generate(self, index: int) -> dict[str, Any]:
        """Draw sample `index` of the split (ignores `subset` and `transform`)."""
        if not 0 <= index < self.split_length:
            raise IndexError(f"split index {index} out of range [0, {self.split_length})")
        img, mask, instances, inst_classes = self._render(self.rng_for(index))
        image = (img - self._mean) * self._inv_std
        # Classes present in the mask; ignore pixels are counted in an extra bin and dropped.
        counts = np.bincount(
            np.where(mask == self.ignore_index, self.num_classes, mask).ravel(), minlength=self.num_classes + 1
        )
        labels = (counts[: self.num_classes] > 0).astype(np.float32)
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(mask),
            "instances": torch.from_numpy(instances),
            "instance_classes": torch.from_numpy(inst_classes),
            "image_labels": torch.from_numpy(labels),
            "labelled": torch.from_numpy(np.array(self.is_labelled(index))),  # 0-d bool; from_numpy is 4x cheaper
            "index": index,
        }
        if self.panoptic:
            sample["panoptic"] = torch.from_numpy(panoptic_map(mask, instances, self.ignore_index, LABEL_DIVISOR))
        return sample

    def _pick_thing(self, rng: _Draws, main_stuff: int) -> int:
        pool = self._thing_pool
        preferring = [t for t in pool if self._preferred[t] == main_stuff]
        others = [t for t in pool if self._preferred[t] != main_stuff]
        if rng.random() < self.config.cooccurrence:
            choices = preferring or others
        else:
            choices = others or preferring
        return choices[int(rng.integers(len(choices)))]

    def _render(self, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.config
        rng = _Draws(generator, 40 + 24 * cfg.max_instances)
        h, w = cfg.image_size
        names = cfg.class_names

        # Stuff: a main texture, sometimes a second one entering from one side along a wavy edge.
        main = self._stuff_pool[int(rng.integers(len(self._stuff_pool)))]
        semantic = np.full((h, w), main, np.int64)
        img = _TEXTURES[names[main]](rng, h, w)
        others = [s for s in self._stuff_pool if s != main]
        if others and rng.random() < cfg.second_stuff_prob:
            second = others[int(rng.integers(len(others)))]
            side = int(rng.integers(4))
            along, across = (w, h) if side < 2 else (h, w)
            depth = rng.uniform(0.2, 0.4) * across
            t = np.arange(along, dtype=np.float32)
            edge = depth + 0.08 * across * np.sin(2 * np.pi * t / (along * rng.uniform(0.5, 1.5)) + rng.uniform(0, 6.3))
            pos = np.arange(across, dtype=np.float32)[:, None]  # (across, along)
            region = pos < edge[None, :] if side % 2 == 0 else pos >= (across - edge[None, :])
            if side >= 2:
                region = region.T
            semantic[region] = second
            img = np.where(region, _TEXTURES[names[second]](rng, h, w), img)

        # Things, painted back to front; later ones occlude earlier ones.
        instances = np.zeros((h, w), np.int64)
        n_things = (
            int(cfg.min_instances + rng.integers(cfg.max_instances - cfg.min_instances + 1)) if self._thing_pool else 0
        )
        classes: list[int] = []
        centres: list[tuple[float, float, float]] = []
        side = float(min(h, w))
        centre_y, sub_y = _pixel_coords(h)
        centre_x, sub_x = _pixel_coords(w)
        for _ in range(n_things):
            cls = self._pick_thing(rng, main)
            name = names[cls]
            r = rng.uniform(*cfg.scale_range) * side * (1.1 if name == "triangle" else 1.0)
            if centres and rng.random() < cfg.occlusion_prob:
                ox, oy, orad = centres[int(rng.integers(len(centres)))]
                ang = rng.uniform(0, 2 * np.pi)
                dist = rng.uniform(0.5, 0.9) * (r + orad)
                cx, cy = ox + dist * math.cos(ang), oy + dist * math.sin(ang)
            else:
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            theta = rng.uniform(0, 2 * np.pi)
            params = _shape_params(name, rng)
            hue = self._hue_centre[cls] + rng.uniform(-cfg.hue_width, cfg.hue_width)
            colour = _hsv(hue, rng.uniform(0.5, 0.95), rng.uniform(0.55, 0.95))
            shade_dir = rng.uniform(0, 2 * np.pi)
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
            if x0 >= x1 or y0 >= y1:
                continue
            # Supersampled coordinates of the bounding box: (bh * 2, bw * 2), rotated into the shape frame.
            ys = sub_y[2 * y0 : 2 * y1, None] - cy
            xs = sub_x[None, 2 * x0 : 2 * x1] - cx
            c, s = math.cos(theta), math.sin(theta)
            u = xs * c + ys * s
            v = -xs * s + ys * c
            inside = _inside(name, u, v, r, params).astype(np.float32)
            bh, bw = y1 - y0, x1 - x0
            alpha = inside.reshape(bh, 2, bw, 2).sum(axis=(1, 3)) * 0.25
            label = alpha >= 0.5
            if not label.any():
                continue
            # Linear shading across the shape plus a little noise, so a thing is not a flat colour.
            gx = (centre_x[None, x0:x1] - cx) * (0.22 * math.cos(shade_dir) / r)
            gy = (centre_y[y0:y1, None] - cy) * (0.22 * math.sin(shade_dir) / r)
            shade = (gx + 1) + gy + rng.normal(bh, bw) * 0.03
            box = img[:, y0:y1, x0:x1]
            box += (colour * shade - box) * alpha  # alpha-composite over what is already painted
            classes.append(cls)
            centres.append((cx, cy, r))
            instances[y0:y1, x0:x1][label] = len(classes)

        # Labels: the band around every thing (both sides of its edge) is ambiguous after anti-aliasing.
        band = _chebyshev_band(instances, cfg.boundary_width)
        cls_of = np.asarray([0] + classes, np.int64)
        mask = np.where(instances > 0, cls_of[instances], semantic)
        mask[band] = cfg.ignore_index

        # Drop instances that occlusion or the band reduced below a nameable size, and, in "ignore" mode, unseen
        # ones; renumber the survivors 1..n in paint order.
        if classes:
            labelled_area = np.bincount(instances[~band], minlength=len(classes) + 1)
            unseen = set(cfg.unseen_ids) if self.unseen == "ignore" else set()
            keep = [
                i + 1
                for i, c in enumerate(classes)
                if labelled_area[i + 1] >= max(cfg.min_visible_pixels, 1) and c not in unseen
            ]
            remap = np.zeros(len(classes) + 1, np.int64)
            remap[keep] = np.arange(1, len(keep) + 1)
            dropped = (instances > 0) & (remap[instances] == 0)
            mask[dropped] = cfg.ignore_index
            instances = remap[instances]
            classes = [classes[i - 1] for i in keep]
        if self.unseen == "ignore":
            mask[np.isin(mask, cfg.unseen_ids)] = cfg.ignore_index  # unseen stuff too

        inst_classes = np.full(cfg.max_instances, -1, np.int64)
        inst_classes[: len(classes)] = classes

        # Global photometric jitter and sensor noise.
        contrast = 1 + rng.uniform(-cfg.contrast, cfg.contrast)
        gain = np.asarray([rng.uniform(0.95, 1.05) for _ in range(3)], np.float32).reshape(3, 1, 1)
        img = (img - 0.5) * contrast + 0.5 + rng.uniform(-cfg.brightness, cfg.brightness)
        img = img * gain + rng.normal(3, h, w) * cfg.noise_std
        np.clip(img, 0.0, 1.0, out=img)
        return img.astype(np.float32, copy=False), mask, instances, inst_classes


# ----------------------------------------------------------------------------------------------------------------
# Statistics and speed.


def estimate_mean_std(dataset: ShapesDataset, n: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std of the un-normalised images of the first n samples (how MEAN / STD were made)."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in range(min(n, dataset.split_length)):
        img, *_ = dataset._render(dataset.rng_for(i))
        flat = img.reshape(3, -1).T.astype(np.float64)
        total += flat.sum(0)
        total_sq += (flat**2).sum(0)
        count += flat.shape[0]
    mean = total / count
    std = np.sqrt(total_sq / count - mean**2)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def benchmark_generation(image_size: int | tuple[int, int] = 64, n: int = 500, seed: int = 0) -> float:
    """Samples per second of `ShapesDataset.__getitem__` in this process (single thread of Python)."""
    ds = ShapesDataset("train", length=n, config=ShapesConfig(image_size=image_size), seed=seed)
    ds[0]  # warm the interpolation-matrix caches
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - start)
