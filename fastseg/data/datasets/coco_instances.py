"""COCO instance segmentation (2014 or 2017): polygons and RLE through pycocotools, 80 thing classes.

Layout (the official ``annotations_trainval2017.zip``)::

    coco/
      train2017/000000000009.jpg ...   val2017/...        (train2014/, val2014/ with year=2014)
      annotations/instances_{train,val}2017.json

``annotations[i].segmentation`` is a list of polygons (``iscrowd=0``) or an RLE dict (``iscrowd=1``: uncompressed
``counts`` list, or a compressed string); both are decoded with ``pycocotools.mask``. Contiguous class ids follow the
category ids in increasing order (0..79 for COCO's 80). Per sample, non-crowd instances are painted largest first (so a
small object on a large one stays visible) into ``"instances"`` (1..n) with ``"instance_classes"``; ``"mask"`` holds
their classes, crowd regions and pixels of no instance are ``ignore_index`` (the instance task has no background
class). :meth:`instance_masks` returns the overlapping per-instance masks (crowd included) for AP evaluation.

Images without any annotation are dropped from the training split (``filter_empty``), as detectron2 does.

Zero-shot (the ZSI protocol PADing follows, on COCO 2014: ``year=2014``): ``unseen="pading"`` marks the 17 unseen
classes of the 48/17 split (bus, dog, cow, elephant, umbrella, tie, skateboard, cup, knife, cake, couch, keyboard, sink,
scissors, airplane, cat, snowboard); any other list (e.g. the 65/15 split's) can be passed by name. Training images
with an unseen instance are dropped (default ``unseen_mode="exclude"``). The 48/17 protocol's 15 classes outside the
split stay in the class list here; filter the JSON to remove them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..transforms import EvalProtocol, TrainPipeline
from ._base import FolderDataset, Record
from ._coco import coco_root, load_json

__all__ = ["PADING_ZSI_UNSEEN", "COCOInstancesDataset", "decode_segmentation"]

PADING_ZSI_UNSEEN: tuple[str, ...] = (
    "bus", "dog", "cow", "elephant", "umbrella", "tie", "skateboard", "cup", "knife", "cake", "couch", "keyboard",
    "sink", "scissors", "airplane", "cat", "snowboard",
)  # fmt: skip


def decode_segmentation(segmentation: Any, height: int, width: int, source: str = "") -> np.ndarray:
    """A COCO ``segmentation`` field (polygons, uncompressed or compressed RLE) -> (H, W) bool mask."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:  # pragma: no cover - pycocotools is in the test / data extras
        raise ImportError("reading COCO instance annotations needs pycocotools (pip install pycocotools)") from err
    try:
        if isinstance(segmentation, list):
            if not segmentation:
                return np.zeros((height, width), bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            rle = segmentation
            if isinstance(rle["counts"], list):
                rle = mask_utils.frPyObjects(rle, height, width)
            elif isinstance(rle["counts"], str):
                rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            if list(rle["size"]) != [height, width]:
                raise ValueError(f"RLE size {list(rle['size'])} differs from the image's {[height, width]}")
        else:
            raise ValueError(f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}")
        with warnings.catch_warnings():  # pycocotools' NumPy-2 copy= DeprecationWarning, not ours to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise ValueError(f"{source}: cannot decode a COCO segmentation: {err}") from err


class COCOInstancesDataset(FolderDataset):
    """COCO instances. ``root`` is the COCO folder; ``year`` is 2017 (default) or 2014; ``filter_empty`` drops
    images without annotations (default: on the training split)."""

    name = "coco_instances"
    default_pipeline = TrainPipeline(
        scale=(1024, 1024), ratio_range=(0.1, 2.0), crop_size=(1024, 1024), cat_max_ratio=1.0, photometric=False
    )
    eval_protocol = EvalProtocol(mode="whole", scale=(1333, 800))
    train_unseen_mode = "exclude"
    pading_unseen = PADING_ZSI_UNSEEN
    has_instances = True
    layout = "coco/{train2017,val2017}/*.jpg and coco/annotations/instances_{train,val}2017.json"

    def __init__(
        self, root: Any, split: str = "train", *, year: int = 2017, filter_empty: bool | None = None, **options: Any
    ) -> None:
        root = coco_root(root, self, split)
        self.json_path = root / "annotations" / f"instances_{split}{year}.json"
        self.image_dir = root / f"{split}{year}"
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.name}: missing folder {self.image_dir}; expected {self.layout}")
        data = load_json(self.json_path, ("images", "annotations", "categories"), "COCO instances")
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        self.category_to_class = {int(c["id"]): i for i, c in enumerate(categories)}
        self.class_names = tuple(str(c["name"]) for c in categories)
        self.thing_classes = tuple(range(len(categories)))
        from ..shapes import make_palette

        self.palette = make_palette(len(categories))
        self.filter_empty = split == "train" if filter_empty is None else bool(filter_empty)
        self._images = data["images"]
        self._by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            for key in ("image_id", "category_id", "segmentation"):
                if key not in ann:
                    raise ValueError(f"{self.json_path}: annotation {ann.get('id')} lacks the field {key!r}")
            if int(ann["category_id"]) not in self.category_to_class:
                raise ValueError(
                    f"{self.json_path}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                    "which is not among the JSON's categories"
                )
            self._by_image.setdefault(int(ann["image_id"]), []).append(ann)
        super().__init__(root, split, **options)

    def _scan(self) -> Iterable[Record]:
        for info in sorted(self._images, key=lambda im: str(im["file_name"])):
            anns = self._by_image.get(int(info["id"]), [])
            if self.filter_empty and not any(not a.get("iscrowd", 0) for a in anns):
                continue
            image = self.image_dir / info["file_name"]
            if not image.is_file():
                raise FileNotFoundError(f"{self.name}: image {image} (listed in {self.json_path.name}) is missing")
            yield Record(
                image,
                None,
                Path(info["file_name"]).stem,
                extra={"height": int(info["height"]), "width": int(info["width"]), "annotations": anns},
            )

    def _classes_of(self, record: Record) -> np.ndarray:
        return np.asarray(
            sorted({self.category_to_class[int(a["category_id"])] for a in record.extra["annotations"]}), np.int64
        )

    def instance_masks(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(masks (N, H, W) bool, classes (N,), iscrowd (N,))`` of sample ``j``, in JSON order, overlaps kept."""
        return self._decode(self.record(j))

    def _decode(self, record: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = record.extra["height"], record.extra["width"]
        anns = record.extra["annotations"]
        source = f"{self.json_path} ({record.image.name})"
        masks = np.zeros((len(anns), h, w), bool)
        for k, ann in enumerate(anns):
            masks[k] = decode_segmentation(ann["segmentation"], h, w, f"{source} annotation {ann.get('id')}")
        classes = np.asarray([self.category_to_class[int(a["category_id"])] for a in anns], np.int64)
        crowd = np.asarray([int(a.get("iscrowd", 0)) for a in anns], np.int64)
        return masks, classes, crowd

    def _load_targets(self, record: Record) -> dict[str, Any]:
        masks, classes, crowd = self._decode(record)
        h, w = record.extra["height"], record.extra["width"]
        mask = np.full((h, w), self.ignore_index, np.int64)
        instances = np.zeros((h, w), np.int64)
        order = [k for k in np.argsort(-masks.sum(axis=(1, 2)), kind="stable") if not crowd[k]]
        kept_classes = []
        for k in order:
            kept_classes.append(classes[k])
            instances[masks[k]] = len(kept_classes)
            mask[masks[k]] = classes[k]
        # An instance completely hidden by smaller ones on top keeps no pixel; drop it and renumber.
        visible = np.zeros(len(kept_classes) + 1, bool)
        visible[np.unique(instances)] = True
        visible[0] = True
        remap = np.zeros(len(kept_classes) + 1, np.int64)
        remap[visible] = np.arange(int(visible.sum()))
        kept = [c for c, v in zip(kept_classes, visible[1:]) if v]
        return {"mask": mask, "instances": remap[instances], "instance_classes": np.asarray(kept, np.int64)}
