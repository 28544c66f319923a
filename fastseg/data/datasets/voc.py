"""PASCAL VOC 2012 segmentation with the SBD ``train_aug`` split: 21 classes (background included), 255 = border.

Layout (``VOCtrainval_11-May-2012.tar``, plus SBD's ``benchmark.tgz`` or mmseg's converted ``SegmentationClassAug``)::

    VOCdevkit/VOC2012/
      JPEGImages/2007_000032.jpg ...
      SegmentationClass/2007_000032.png ...        palette PNGs (mode P): 0..20, 255 on object borders
      SegmentationClassAug/2007_000032.png ...     optional: mmseg's voc_aug converter output (mode L, 0..20, 255)
      ImageSets/Segmentation/{train,val,trainval}.txt   one image id per line (aug.txt: optional train_aug list)
    VOCdevkit/VOCaug/dataset/                      optional: SBD (benchmark_RELEASE/dataset)
      cls/2008_000002.mat ...                      MATLAB struct GTcls.Segmentation, read through scipy
      train.txt  val.txt

Splits: ``train`` (1 464), ``val`` (1 449), ``trainval`` and ``train_aug`` (10 582 with the full SBD: VOC train, SBD
train and SBD val, minus VOC val). A ``train_aug`` image's label is its ``SegmentationClassAug`` PNG, else its VOC
``SegmentationClass`` PNG, else its SBD ``.mat``. ``sbd_root=`` points at SBD's ``dataset`` folder when it lies
elsewhere.

Palette PNGs are decoded to their *indices* (the class ids), never to colours; a VOC label saved as RGB is reported
as such, with the hint that its colours are the VOC palette.

Protocol: mmseg's ``voc12aug`` configs: keep-ratio resize of ``(2048, 512)`` x 0.5-2.0, 512 x 512 crops, flip,
photometric distortion; whole-image test resized into ``(2048, 512)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
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

__all__ = ["VOC_CLASSES", "VOCDataset", "voc_palette"]

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC colour map (n, 3) uint8: the bits of the index spread over R, G, B from the high bit down."""
    palette = np.zeros((n, 3), np.uint8)
    for index in range(n):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _load_sbd_mat(path: Path) -> np.ndarray:
    try:
        from scipy.io import loadmat
    except ImportError as err:  # pragma: no cover - scipy is in the test / data extras
        raise ImportError(
            f"reading SBD's {path.name} needs scipy (pip install scipy), or convert SBD to "
            "SegmentationClassAug PNGs first"
        ) from err
    try:
        content = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        return np.asarray(content["GTcls"].Segmentation).astype(np.int64)
    except (KeyError, AttributeError, ValueError, OSError) as err:
        raise ValueError(
            f"{path}: not an SBD class annotation (expected a MATLAB struct GTcls with a 'Segmentation' field): {err}"
        ) from err


class VOCDataset(FolderDataset):
    """PASCAL VOC 2012 (+ SBD for ``train_aug``). ``root`` is ``VOCdevkit/VOC2012``, ``VOCdevkit`` or its parent.

    Extra option: ``sbd_root`` (SBD's ``dataset`` folder; default ``VOCdevkit/VOCaug/dataset`` when it exists).
    """

    name = "voc"
    class_names = VOC_CLASSES
    palette = voc_palette(21)
    splits = ("train", "val", "trainval", "train_aug")
    train_splits = ("train", "trainval", "train_aug")
    default_pipeline = TrainPipeline(scale=(2048, 512), crop_size=(512, 512))
    eval_protocol = EvalProtocol(mode="whole", scale=(2048, 512))
    layout = (
        "VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
        "ImageSets/Segmentation/{train,val,trainval}.txt} (+ SegmentationClassAug/ or VOCdevkit/VOCaug/dataset/cls/)"
    )

    def __init__(self, root: Any, split: str = "train", *, sbd_root: str | Path | None = None, **options: Any) -> None:
        self.sbd_root = Path(sbd_root).expanduser() if sbd_root is not None else None
        super().__init__(root, split, **options)

    def _find_root(self) -> Path:
        for candidate in (self.root, self.root / "VOC2012", self.root / "VOCdevkit" / "VOC2012"):
            if (candidate / "JPEGImages").is_dir() or (candidate / "ImageSets").is_dir():
                return candidate
        return self.root

    def _scan(self) -> Iterable[Record]:
        root = self.root = self._find_root()
        images = require_dir(root / "JPEGImages", "VOC images", f"expected {self.layout}")
        sets = require_dir(root / "ImageSets" / "Segmentation", "VOC split lists", f"expected {self.layout}")
        sbd = self.sbd_root or root.parent / "VOCaug" / "dataset"
        if self.split == "train_aug":
            ids = self._train_aug_ids(root, sets, sbd)
        else:
            list_file = sets / f"{self.split}.txt"
            if not list_file.is_file():
                raise FileNotFoundError(f"{self.name}: missing split list {list_file}")
            ids = _read_ids(list_file)
        for key in ids:
            image = images / f"{key}.jpg"
            if not image.is_file():
                raise FileNotFoundError(f"{self.name} {self.split}: image {image} listed in the split is missing")
            candidates = [root / "SegmentationClass" / f"{key}.png"]
            if self.split == "train_aug":
                candidates = [root / "SegmentationClassAug" / f"{key}.png", *candidates, sbd / "cls" / f"{key}.mat"]
            label = next((c for c in candidates if c.is_file()), None)
            if label is None:
                raise missing_label_error(self.name, image, candidates)
            yield Record(image, label, key)

    def _train_aug_ids(self, root: Path, sets: Path, sbd: Path) -> list[str]:
        for name in ("aug.txt", "train_aug.txt"):
            if (sets / name).is_file():
                return _read_ids(sets / name)
        val = set(_read_ids(sets / "val.txt")) if (sets / "val.txt").is_file() else set()
        voc_train = _read_ids(sets / "train.txt") if (sets / "train.txt").is_file() else []
        if (sbd / "train.txt").is_file():
            pool = (
                voc_train
                + _read_ids(sbd / "train.txt")
                + (_read_ids(sbd / "val.txt") if (sbd / "val.txt").is_file() else [])
            )
        elif (root / "SegmentationClassAug").is_dir():
            pool = voc_train + sorted(p.stem for p in (root / "SegmentationClassAug").glob("*.png"))
        else:
            raise FileNotFoundError(
                f"{self.name} train_aug needs SBD: expected {sets / 'aug.txt'}, {root / 'SegmentationClassAug'} or "
                f"SBD's train.txt / cls/*.mat under {sbd} (or pass sbd_root=)"
            )
        seen: set[str] = set()
        ids = [k for k in pool if k not in val and not (k in seen or seen.add(k))]
        return sorted(ids)

    def _load_targets(self, record: Record) -> dict[str, Any]:
        if record.label.suffix == ".mat":
            mask = _load_sbd_mat(record.label)
        else:
            mask = read_label_png(record.label, voc_palette(256), self.max_pixels)
        self.check_label_range(mask, record.label, 21, "VOC class ids 0..20 (0 = background) or 255 (border)")
        return {"mask": mask}
