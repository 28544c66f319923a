"""COCO-Stuff 164k: 171 classes (80 things + 91 stuff) from the 182 COCO category ids, ignore 255.

Layout (mmsegmentation's ``coco_stuff164k``; the raw ``stuffthingmaps_trainval2017.zip`` also works)::

    coco_stuff164k/
      images/{train2017,val2017}/000000000009.jpg ...            (or train2017/, val2017/ beside the labels)
      annotations/{train2017,val2017}/000000000009_labelTrainIds.png   mmseg's converter output: 0..170, 255
                                      000000000009.png                 raw stuffthingmaps: category id - 1, 255
      (or stuffthingmaps_trainval2017/{train2017,val2017}/000000000009.png)

Raw maps store ``category_id - 1`` (0..181) with 255 unlabelled. Eleven of those 182 ids are never used (things 12,
26, 29, 30, 45, 66, 68, 69, 71, 83 and 91), so the 171 used ids map, in order, to 0..170; a raw value of an unused id
is an error naming the file. ``*_labelTrainIds.png`` files already hold 0..170 and are used when present.

Zero-shot (PADing's ZSS protocol, ZegFormer's split): ``unseen="pading"`` marks cow, giraffe, suitcase, frisbee,
skateboard, carrot, scissors, cardboard, clouds, grass, playingfield, river, road, tree and wall-concrete; on the
training split their pixels become ignore (the default ``unseen_mode``), evaluation keeps all 171. ZegFormer orders the
classes seen-first; here they keep COCO's order and ``seen_classes`` / ``unseen_classes`` list the ids.

Protocol: mmseg's COCO-Stuff 164k configs (keep-ratio resize of ``(2048, 512)`` x 0.5-2.0, 512 x 512 crops, whole-image
test resized into ``(2048, 512)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..shapes import make_palette
from ..transforms import EvalProtocol, TrainPipeline
from ._base import FolderDataset, Record, missing_label_error, read_label_png
from ._coco import COCO_STUFF_CLASSES, COCO_THING_CLASSES, COCO_THING_IDS

__all__ = ["COCO_STUFF_171_CLASSES", "RAW_TO_TRAIN_ID", "COCOStuffDataset"]

COCO_STUFF_171_CLASSES: tuple[str, ...] = COCO_THING_CLASSES + COCO_STUFF_CLASSES

# Raw value (category id - 1, 0..181) -> train id 0..170; unused ids and 255 -> 255.
_USED_IDS = np.asarray(list(COCO_THING_IDS) + list(range(92, 183)))
RAW_TO_TRAIN_ID: np.ndarray = np.full(256, 255, np.uint8)
RAW_TO_TRAIN_ID[_USED_IDS - 1] = np.arange(171)
_RAW_VALID = np.zeros(256, bool)
_RAW_VALID[_USED_IDS - 1] = True
_RAW_VALID[255] = True

PADING_ZSS_UNSEEN: tuple[str, ...] = (
    "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard", "clouds", "grass",
    "playingfield", "river", "road", "tree", "wall-concrete",
)  # fmt: skip


class COCOStuffDataset(FolderDataset):
    """COCO-Stuff 164k, 171 classes. ``root`` is ``coco_stuff164k`` (or the COCO folder with the stuff maps)."""

    name = "coco_stuff"
    class_names = COCO_STUFF_171_CLASSES
    palette = make_palette(171)
    thing_classes = tuple(range(80))
    default_pipeline = TrainPipeline(scale=(2048, 512), crop_size=(512, 512))
    eval_protocol = EvalProtocol(mode="whole", scale=(2048, 512))
    pading_unseen = PADING_ZSS_UNSEEN
    train_unseen_mode = "ignore"
    layout = (
        "coco_stuff164k/{images,annotations}/{train2017,val2017}/<id>.jpg and <id>_labelTrainIds.png "
        "(or raw <id>.png stuff maps)"
    )

    def _dirs(self) -> tuple[Path, Path]:
        if not (self.root / "images").is_dir() and (self.root / "coco_stuff164k").is_dir():
            self.root = self.root / "coco_stuff164k"  # a parent folder (e.g. $FASTSEG_DATASETS)
        sub = f"{self.split}2017"
        image_dirs = [self.root / "images" / sub, self.root / sub]
        label_dirs = [
            self.root / "annotations" / sub,
            self.root / "stuffthingmaps_trainval2017" / sub,
            self.root / "stuffthingmaps" / sub,
        ]
        image_dir = next((d for d in image_dirs if d.is_dir()), None)
        label_dir = next((d for d in label_dirs if d.is_dir()), None)
        if image_dir is None or label_dir is None:
            missing = image_dirs if image_dir is None else label_dirs
            raise FileNotFoundError(
                f"{self.name}: missing folder {' or '.join(str(d) for d in missing)}; expected {self.layout}"
            )
        return image_dir, label_dir

    def _scan(self) -> Iterable[Record]:
        image_dir, label_dir = self._dirs()
        for image in sorted(image_dir.glob("*.jpg")):
            train_ids = label_dir / f"{image.stem}_labelTrainIds.png"
            raw = label_dir / f"{image.stem}.png"
            if train_ids.is_file():
                yield Record(image, train_ids, image.stem, extra="trainIds")
            elif raw.is_file():
                yield Record(image, raw, image.stem, extra="raw")
            else:
                raise missing_label_error(self.name, image, [train_ids, raw])

    def _load_targets(self, record: Record) -> dict[str, Any]:
        labels = read_label_png(record.label, None, self.max_pixels)
        if record.extra == "trainIds":
            self.check_label_range(labels, record.label, 171, "COCO-Stuff train ids 0..170 or 255")
            return {"mask": labels}
        bad = (labels < 0) | (labels > 255) | ~_RAW_VALID[np.clip(labels, 0, 255)]
        if bad.any():
            values = np.unique(labels[bad])
            raise ValueError(
                f"{record.label}: raw COCO-Stuff value {int(values[0])} is not a used category id - 1 "
                f"({int(bad.sum())} pixels; values {values[:6].tolist()}); expected 0..181 without the 11 unused "
                "ids, or 255"
            )
        return {"mask": RAW_TO_TRAIN_ID[labels]}
