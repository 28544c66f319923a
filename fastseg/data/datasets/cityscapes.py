"""Cityscapes (fine annotations): 19 evaluation classes ("train ids"), ignore 255.

Layout (as downloaded: ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    cityscapes/
      leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      (ids 0..33)
                                     <city>_<seq>_<frame>_gtFine_labelTrainIds.png (optional: 0..18, 255)

``*_labelTrainIds.png`` (written by cityscapesscripts' ``createTrainIdLabelImgs.py`` or mmseg's converter) is used
when present; otherwise ``*_labelIds.png`` is mapped through the official label table: the 19 classes with
``ignoreInEval=False`` get train ids 0..18 and every other id (unlabeled, ego vehicle, rectification border, out of
roi, static, dynamic, ground, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) becomes 255.
A labelId above 33 is an error naming the file.

Protocol: mmseg's Cityscapes pipeline (keep-ratio resize of ``(2048, 1024)`` x 0.5-2.0, crop with cat_max_ratio 0.75,
flip, photometric distortion) with GSS's 768 x 768 crops, and sliding-window testing with 768 x 768 windows every
512 pixels (GSS's Cityscapes configs; UniMatch also tests Cityscapes with a sliding window).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..transforms import EvalProtocol, TrainPipeline
from ..validate import describe_bad_labels
from ._base import (
    FolderDataset,
    Record,
    missing_label_error,
    read_label_png,
    require_dir,
)

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "LABEL_ID_TO_TRAIN_ID", "CityscapesDataset"]

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# The official visualisation colours of the 19 train ids.
CITYSCAPES_PALETTE: np.ndarray = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
        (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
        (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    np.uint8,
)  # fmt: skip

# labelId (0..33) -> train id, from the label table of cityscapesscripts (helpers/labels.py); 255 = not evaluated.
LABEL_ID_TO_TRAIN_ID: np.ndarray = np.full(256, 255, np.uint8)
for _label_id, _train_id in {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}.items():
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id


class CityscapesDataset(FolderDataset):
    """Cityscapes fine annotations as 19 train ids. ``root`` holds ``leftImg8bit/`` and ``gtFine/``.

    Extra option: ``label_kind`` = ``"auto"`` (``*_labelTrainIds.png`` when it exists, else ``*_labelIds.png``),
    ``"trainIds"`` or ``"labelIds"``. See :class:`fastseg.data.datasets.FolderDataset` for the shared options.
    """

    name = "cityscapes"
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    splits = ("train", "val", "test")
    default_pipeline = TrainPipeline(scale=(2048, 1024), crop_size=(768, 768))
    eval_protocol = EvalProtocol(mode="slide", crop_size=(768, 768), stride=(512, 512))
    layout = (
        "cityscapes/{leftImg8bit,gtFine}/{train,val,test}/<city>/<city>_<seq>_<frame>_{leftImg8bit,gtFine_labelIds}.png"
    )

    def __init__(self, root: Any, split: str = "train", *, label_kind: str = "auto", **options: Any) -> None:
        if label_kind not in ("auto", "trainIds", "labelIds"):
            raise ValueError(f"label_kind must be 'auto', 'trainIds' or 'labelIds', got {label_kind!r}")
        self.label_kind = label_kind
        super().__init__(root, split, **options)

    def _scan(self) -> Iterable[Record]:
        root = self.root
        if not (root / "leftImg8bit").is_dir() and (root / "cityscapes").is_dir():
            root = self.root = root / "cityscapes"
        image_dir = require_dir(root / "leftImg8bit" / self.split, "Cityscapes images", f"expected {self.layout}")
        label_dir = require_dir(root / "gtFine" / self.split, "Cityscapes fine labels", f"expected {self.layout}")
        suffix = "_leftImg8bit.png"
        for image in sorted(image_dir.glob(f"*/*{suffix}")):
            key = image.name[: -len(suffix)]
            folder = label_dir / image.parent.name
            train_ids = folder / f"{key}_gtFine_labelTrainIds.png"
            label_ids = folder / f"{key}_gtFine_labelIds.png"
            if self.label_kind == "trainIds" or (self.label_kind == "auto" and train_ids.is_file()):
                label, kind = train_ids, "trainIds"
            else:
                label, kind = label_ids, "labelIds"
            if not label.is_file():
                expected = [train_ids] if self.label_kind == "trainIds" else [label_ids]
                expected += [train_ids] if self.label_kind == "auto" else []
                raise missing_label_error(self.name, image, expected)
            yield Record(image, label, key, extra=kind)

    def _load_targets(self, record: Record) -> dict[str, Any]:
        raw = read_label_png(record.label, self.palette, self.max_pixels)
        if record.extra == "trainIds":
            self.check_label_range(raw, record.label, 19, "Cityscapes train ids 0..18 or 255")
            return {"mask": raw}
        problem = describe_bad_labels(raw, 34, None)  # 255 is not a labelId either
        if problem:
            raise ValueError(
                f"{record.label}: {problem} is outside the class range; expected Cityscapes labelIds 0..33"
            )
        return {"mask": LABEL_ID_TO_TRAIN_ID[raw]}
