"""COCO facts shared by the COCO-Stuff, panoptic and instance readers: class names, category ids, JSON loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["COCO_STUFF_CLASSES", "COCO_THING_CLASSES", "COCO_THING_IDS", "coco_root", "load_json", "rgb2id"]

# The 80 thing classes in category-id order (ids in COCO_THING_IDS).
COCO_THING_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip

# COCO category ids of the 80 things: 1..90 without the 10 ids the 2014/2017 releases never used.
COCO_THING_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

# The 91 COCO-Stuff stuff classes, category ids 92..182 in order.
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

assert len(COCO_THING_IDS) == len(COCO_THING_CLASSES) == 80 and len(COCO_STUFF_CLASSES) == 91


def rgb2id(rgb: Any) -> Any:
    """Panoptic PNG colour -> segment id: ``R + 256 G + 256^2 B`` (panopticapi's encoding); (H, W, 3) -> (H, W)."""
    import numpy as np

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb2id expects an (H, W, 3) array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def load_json(path: Path, required: tuple[str, ...], what: str) -> dict[str, Any]:
    """Read a COCO-style JSON file and check its top-level keys, naming the file and the missing keys."""
    if not path.is_file():
        raise FileNotFoundError(f"missing annotation file {path} ({what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{path}: {what} JSON lacks the fields {missing} (has {sorted(data)[:8]})")
    return data


def coco_root(root: Any, reader: Any, split: str) -> Path:
    """The COCO folder of a JSON-driven reader: ``root`` itself or its ``coco/`` child (a ``$FASTSEG_DATASETS``
    parent), after checking ``split`` and that the folder exists; errors name the reader and its layout."""
    if split not in reader.splits:
        raise ValueError(f"{reader.name}: unknown split {split!r}; choose one of {list(reader.splits)}")
    path = Path(root).expanduser()
    if not (path / "annotations").is_dir() and (path / "coco" / "annotations").is_dir():
        path = path / "coco"
    if not path.is_dir():
        raise FileNotFoundError(f"{reader.name}: dataset root {path} does not exist; expected {reader.layout}")
    return path
