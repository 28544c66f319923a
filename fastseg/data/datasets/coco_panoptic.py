"""COCO panoptic 2017: 133 classes (80 things + 53 stuff), segment PNGs + JSON, for Mask2Former and PADing.

Layout (the official ``panoptic_annotations_trainval2017.zip``; detectron2 reads the same files)::

    coco/
      train2017/000000000009.jpg ...   val2017/...
      annotations/panoptic_{train,val}2017.json
      panoptic_{train,val}2017/000000000009.png ...    (or annotations/panoptic_{train,val}2017/)

Each PNG is RGB-encoded: segment id = R + 256 G + 256^2 B (``rgb2id``), 0 = unlabelled. The JSON's
``annotations[i].segments_info`` gives each segment's ``category_id`` and ``iscrowd``; ``categories`` gives ``name``,
``isthing`` and ``color``. Contiguous class ids follow the category ids in increasing order (detectron2's order:
things 0..79, stuff 80..132). Samples carry ``"mask"`` (every segment's class, crowd included; unlabelled 255),
``"instances"`` (non-crowd thing segments 1..n in JSON order) and ``"instance_classes"``, and with ``panoptic=True``
``"panoptic"`` (``class * 1000 + instance``, crowd and unlabelled -1), the target ``fastseg.metrics.panoptic`` takes.
:meth:`segments` and :meth:`panoptic_target` give the full segment list with COCO's crowd flags, for panopticapi's
exact crowd rule.

Zero-shot (PADing's ZSP protocol): ``unseen="pading"`` marks cow, giraffe, suitcase, frisbee, skateboard, carrot,
scissors, cardboard, playingfield, river, road, tree-merged, sky-other-merged, grass-merged (contiguous ids 19, 23,
28, 29, 36, 51, 76, 83, 97, 99, 100, 116, 119, 125); on the training split every image with any unseen segment is
dropped (the default ``unseen_mode="exclude"``); evaluation keeps all 133 classes.

Protocol: Mask2Former's large-scale jitter for training (image fitted into 1024 x 1024 x 0.1-2.0, 1024 x 1024 crop,
no category-ratio check) and a test resize of the short side to 800 (long side at most 1333).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..transforms import EvalProtocol, TrainPipeline
from ._base import FolderDataset, Record, missing_label_error
from ._coco import coco_root, load_json, rgb2id

__all__ = ["PADING_ZSP_UNSEEN", "COCOPanopticDataset"]

PADING_ZSP_UNSEEN: tuple[str, ...] = (
    "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard", "playingfield", "river",
    "road", "tree-merged", "sky-other-merged", "grass-merged",
)  # fmt: skip


def _find(candidates: list[Path], what: str, layout: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"missing {what}: expected {' or '.join(str(c) for c in candidates)} ({layout})")


class COCOPanopticDataset(FolderDataset):
    """COCO panoptic segmentation. ``root`` is the COCO folder (``train2017/``, ``annotations/``, ...)."""

    name = "coco_panoptic"
    default_pipeline = TrainPipeline(
        scale=(1024, 1024), ratio_range=(0.1, 2.0), crop_size=(1024, 1024), cat_max_ratio=1.0, photometric=False
    )
    eval_protocol = EvalProtocol(mode="whole", scale=(1333, 800))
    pading_unseen = PADING_ZSP_UNSEEN
    train_unseen_mode = "exclude"
    has_instances = True
    layout = "coco/{train2017,val2017}/*.jpg, coco/annotations/panoptic_{train,val}2017.json, coco/panoptic_{train,val}2017/*.png"

    def __init__(self, root: Any, split: str = "train", **options: Any) -> None:
        root = coco_root(root, self, split)
        self.json_path = _find([root / "annotations" / f"panoptic_{split}2017.json"], "panoptic JSON", self.layout)
        self.png_dir = _find(
            [root / f"panoptic_{split}2017", root / "annotations" / f"panoptic_{split}2017"],
            "panoptic PNG folder",
            self.layout,
        )
        self.image_dir = _find([root / f"{split}2017", root / "images" / f"{split}2017"], "image folder", self.layout)
        data = load_json(self.json_path, ("images", "annotations", "categories"), "COCO panoptic")
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        for c in categories:
            for key in ("id", "name", "isthing"):
                if key not in c:
                    raise ValueError(f"{self.json_path}: category {c} lacks the field {key!r}")
        self.category_to_class = {int(c["id"]): i for i, c in enumerate(categories)}
        self.class_names = tuple(str(c["name"]) for c in categories)
        self.thing_classes = tuple(i for i, c in enumerate(categories) if int(c["isthing"]))
        self.palette = np.asarray([c.get("color", (0, 0, 0)) for c in categories], np.uint8).reshape(-1, 3)
        self._images = {int(im["id"]): im for im in data["images"]}
        self._annotations = data["annotations"]
        super().__init__(root, split, **options)

    def _scan(self) -> Iterable[Record]:
        for ann in sorted(self._annotations, key=lambda a: str(a["file_name"])):
            for key in ("image_id", "file_name", "segments_info"):
                if key not in ann:
                    raise ValueError(f"{self.json_path}: an annotation lacks the field {key!r}: {str(ann)[:200]}")
            info = self._images.get(int(ann["image_id"]))
            if info is None:
                raise ValueError(
                    f"{self.json_path}: annotation {ann['file_name']} names image_id {ann['image_id']}, "
                    "which is not in 'images'"
                )
            image = self.image_dir / info["file_name"]
            label = self.png_dir / ann["file_name"]
            if not image.is_file():
                raise FileNotFoundError(f"{self.name}: image {image} (listed in {self.json_path.name}) is missing")
            if not label.is_file():
                raise missing_label_error(self.name, image, [label])
            segments = []
            for seg in ann["segments_info"]:
                category = int(seg["category_id"])
                if category not in self.category_to_class:
                    raise ValueError(
                        f"{self.json_path}: segment {seg['id']} of {ann['file_name']} has category_id "
                        f"{category}, which is not among the JSON's categories"
                    )
                segments.append(
                    {
                        "id": int(seg["id"]),
                        "category": self.category_to_class[category],
                        "iscrowd": int(seg.get("iscrowd", 0)),
                    }
                )
            yield Record(image, label, Path(info["file_name"]).stem, extra=segments)

    def _classes_of(self, record: Record) -> np.ndarray:
        return np.asarray(sorted({s["category"] for s in record.extra}), np.int64)

    def _segment_ids(self, record: Record) -> np.ndarray:
        try:
            with Image.open(record.label) as img:
                if img.mode != "RGB":
                    raise ValueError(
                        f"{record.label}: panoptic PNGs are RGB-encoded segment ids (mode RGB), got mode "
                        f"{img.mode}; is this a semantic label map instead?"
                    )
                return rgb2id(np.asarray(img))
        except OSError as err:
            raise OSError(f"cannot read panoptic PNG {record.label}: {err}") from err

    def _load_targets(self, record: Record) -> dict[str, Any]:
        ids = self._segment_ids(record)
        mask = np.full(ids.shape, self.ignore_index, np.int64)
        instances = np.zeros(ids.shape, np.int64)
        crowd = np.zeros(ids.shape, bool)
        classes = []
        known = {0}
        for seg in record.extra:
            region = ids == seg["id"]
            known.add(seg["id"])
            mask[region] = seg["category"]
            if seg["iscrowd"]:
                crowd |= region
            if seg["category"] in self.thing_classes and not seg["iscrowd"]:
                classes.append(seg["category"])
                instances[region] = len(classes)
        unknown = np.setdiff1d(np.unique(ids), np.asarray(sorted(known)))
        if unknown.size:
            raise ValueError(
                f"{record.label}: segment id {int(unknown[0])} appears in the PNG but not in the "
                f"segments_info of {self.json_path.name}"
            )
        return {"mask": mask, "instances": instances, "instance_classes": np.asarray(classes, np.int64), "crowd": crowd}

    def segments(self, j: int) -> tuple[np.ndarray, list[dict[str, int]]]:
        """The ground-truth panoptic map of sample ``j`` at its stored size: ``(segment ids (H, W), segments)`` with
        ``{"id", "category" (contiguous class id), "iscrowd", "isthing"}`` per segment (0 = unlabelled)."""
        record = self.record(j)
        segments = [dict(s, isthing=int(s["category"] in self.thing_classes)) for s in record.extra]
        return self._segment_ids(record), segments

    def panoptic_target(self, j: int, label_divisor: int = 1000) -> tuple[np.ndarray, set[int]]:
        """Sample ``j``'s ground truth as a ``class * label_divisor + instance`` map (void -1; stuff instance 0,
        thing instances numbered 1.. per class) and the set of its crowd ids: the encoding panoptic-quality metrics
        (``fastseg.metrics.panoptic``, detectron2) take."""
        ids, segments = self.segments(j)
        out = np.full(ids.shape, -1, np.int64)
        crowd: set[int] = set()
        per_class: dict[int, int] = {}
        for seg in segments:
            instance = 0
            if seg["isthing"]:
                instance = per_class[seg["category"]] = per_class.get(seg["category"], 0) + 1
            if instance >= label_divisor:
                raise ValueError(f"{self.record(j).label}: more than {label_divisor - 1} segments of one class")
            code = seg["category"] * label_divisor + instance
            out[ids == seg["id"]] = code
            if seg["iscrowd"]:
                crowd.add(code)
        return out, crowd
