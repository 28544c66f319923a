"""ADE20K (SceneParsing, ``ADEChallengeData2016``): 150 classes, label 0 = "other" is ignored.

Layout (as downloaded; mmsegmentation and Mask2Former read the same tree)::

    ADEChallengeData2016/
      images/training/ADE_train_00000001.jpg ...        images/validation/ADE_val_00000001.jpg ...
      annotations/training/ADE_train_00000001.png ...   annotations/validation/ADE_val_00000001.png ...

Annotations are 8-bit single-channel PNGs with 0 = "other / unlabelled" and 1..150 the classes. They are read with
*reduce-zero-label* (mmseg's ``reduce_zero_label=True``): 0 becomes ``ignore_index`` (255) and every other id moves down
by one, so the model's classes are 0..149. An id above 150 is an error naming the file.

Protocol (mmseg's ADE20K configs, which GSS and ECENet use): train with a keep-ratio resize of ``(2048, 512)`` x
0.5-2.0, 512 x 512 crops (cat_max_ratio 0.75), flip, photometric distortion; test the whole image resized into
``(2048, 512)``; multi-scale + flip over the ratios 0.5-1.75.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..transforms import EvalProtocol, TrainPipeline
from ._base import (
    FolderDataset,
    Record,
    missing_label_error,
    read_label_png,
    require_dir,
)

__all__ = ["ADE20K_CLASSES", "ADE20K_PALETTE", "ADE20KDataset"]

ADE20K_CLASSES: tuple[str, ...] = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

# The visualisation colours mmsegmentation uses for ADE20K (one RGB triple per class, in class order).
ADE20K_PALETTE: np.ndarray = np.array(
    [
        int(v)
        for v in """
    120,120,120 180,120,120 6,230,230 80,50,50 4,200,3 120,120,80 140,140,140 204,5,255 230,230,230 4,250,7
    224,5,255 235,255,7 150,5,61 120,120,70 8,255,51 255,6,82 143,255,140 204,255,4 255,51,7 204,70,3 0,102,200
    61,230,250 255,6,51 11,102,255 255,7,71 255,9,224 9,7,230 220,220,220 255,9,92 112,9,255 8,255,214 7,255,224
    255,184,6 10,255,71 255,41,10 7,255,255 224,255,8 102,8,255 255,61,6 255,194,7 255,122,8 0,255,20 255,8,41
    255,5,153 6,51,255 235,12,255 160,150,20 0,163,255 140,140,140 250,10,15 20,255,0 31,255,0 255,31,0 255,224,0
    153,255,0 0,0,255 255,71,0 0,235,255 0,173,255 31,0,255 11,200,200 255,82,0 0,255,245 0,61,255 0,255,112
    0,255,133 255,0,0 255,163,0 255,102,0 194,255,0 0,143,255 51,255,0 0,82,255 0,255,41 0,255,173 10,0,255
    173,255,0 0,255,153 255,92,0 255,0,255 255,0,245 255,0,102 255,173,0 255,0,20 255,184,184 0,31,255 0,255,61
    0,71,255 255,0,204 0,255,194 0,255,82 0,10,255 0,112,255 51,0,255 0,194,255 0,122,255 0,255,163 255,153,0
    0,255,10 255,112,0 143,255,0 82,0,255 163,255,0 255,235,0 8,184,170 133,0,255 0,255,92 184,0,255 255,0,31
    0,184,255 0,214,255 255,0,112 92,255,0 0,224,255 112,224,255 70,184,160 163,0,255 153,0,255 71,255,0 255,0,163
    255,204,0 255,0,143 0,255,235 133,255,0 255,0,235 245,0,255 255,0,122 255,245,0 10,190,212 214,255,0 0,204,255
    20,0,255 255,255,0 0,153,255 0,41,255 0,255,204 41,0,255 41,255,0 173,0,255 0,245,255 71,0,255 122,0,255
    0,255,184 0,92,255 184,255,0 0,133,255 255,214,0 25,194,194 102,255,0 92,0,255
""".replace(",", " ").split()
    ],
    np.uint8,
).reshape(150, 3)

_SPLIT_DIRS = {"train": "training", "val": "validation"}


class ADE20KDataset(FolderDataset):
    """ADE20K SceneParsing with reduce-zero-label. ``root`` is ``ADEChallengeData2016`` or a folder containing it.

    See :class:`fastseg.data.datasets.FolderDataset` for the options shared by every reader.
    """

    name = "ade20k"
    class_names = ADE20K_CLASSES
    palette = ADE20K_PALETTE
    default_pipeline = TrainPipeline(scale=(2048, 512), crop_size=(512, 512))
    eval_protocol = EvalProtocol(mode="whole", scale=(2048, 512))
    layout = "ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}"

    def _scan(self) -> Iterable[Record]:
        root = self.root
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.root = root
        sub = _SPLIT_DIRS[self.split]
        image_dir = require_dir(root / "images" / sub, "ADE20K images", f"expected {self.layout}")
        label_dir = require_dir(root / "annotations" / sub, "ADE20K annotations", f"expected {self.layout}")
        for image in sorted(image_dir.glob("*.jpg")):
            label = label_dir / (image.stem + ".png")
            if not label.is_file():
                raise missing_label_error(self.name, image, [label])
            yield Record(image, label, image.stem)

    def _load_targets(self, record: Record) -> dict[str, Any]:
        raw = read_label_png(record.label, self.palette, self.max_pixels)
        self.check_label_range(
            raw, record.label, 151, "0 (other) or 1..150 (ADE20K class ids before reduce-zero-label)"
        )
        mask = np.where(raw == 0, self.ignore_index, raw - 1)
        mask[raw == self.ignore_index] = self.ignore_index
        return {"mask": mask}
