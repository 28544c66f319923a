"""Readers for the benchmarks the five methods report on, in the layouts people already have on disk.

``build_dataset(name, root, split, **options)`` returns a map-style dataset whose samples have the keys of the
built-in shapes world (``"image"``, ``"mask"``, ``"image_labels"``, ``"labelled"``, ``"index"``; panoptic and instance
readers add ``"instances"`` / ``"instance_classes"``), so every model and the engine use them unchanged. Each
dataset carries ``class_names``, ``palette``, ``ignore_index``, ``mean`` / ``std``, ``eval_protocol`` (how the papers
score it) and ``pretrained_cfg_fields()``. The shared options (transform, labelled / unlabelled splits, zero-shot
``unseen`` classes, verification) are documented on :class:`FolderDataset`; each reader's module docstring gives its
layout and protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._base import FolderDataset, Record, read_image, read_label_png
from .ade20k import ADE20KDataset
from .cityscapes import CityscapesDataset
from .coco_instances import COCOInstancesDataset
from .coco_panoptic import COCOPanopticDataset
from .coco_stuff import COCOStuffDataset
from .voc import VOCDataset

__all__ = [
    "ADE20KDataset",
    "COCOInstancesDataset",
    "COCOPanopticDataset",
    "COCOStuffDataset",
    "CityscapesDataset",
    "FolderDataset",
    "Record",
    "VOCDataset",
    "build_dataset",
    "dataset_class",
    "list_datasets",
    "read_image",
    "read_label_png",
    "register_dataset",
]

_DATASETS: dict[str, type[FolderDataset]] = {}


def register_dataset(cls: type[FolderDataset]) -> type[FolderDataset]:
    """Add a reader under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _DATASETS[cls.name] = cls
    return cls


for _cls in (ADE20KDataset, CityscapesDataset, VOCDataset, COCOStuffDataset, COCOPanopticDataset, COCOInstancesDataset):
    register_dataset(_cls)


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset` (``"shapes"``, the built-in world, is handled by the CLI)."""
    return sorted(_DATASETS)


def dataset_class(name: str) -> type[FolderDataset]:
    """The reader registered as ``name``; a ``ValueError`` lists the known names otherwise."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {list_datasets()}")
    return _DATASETS[name]


def build_dataset(name: str, root: str | Path | None = None, split: str = "train", **options: Any) -> FolderDataset:
    """Open dataset ``name`` at ``root`` (its layout is checked now: missing folders, images without labels, an
    empty split, and the first few label files raise errors naming the file).

    Args:
        name: one of :func:`list_datasets`.
        root: the dataset folder (see each reader's docstring for the tree it expects), or a folder holding it
            under its usual name (``ADEChallengeData2016``, ``cityscapes``, ``VOCdevkit``, ``coco_stuff164k``,
            ``coco``); ``None`` reads ``$FASTSEG_DATASETS``, one root for every dataset.
        split: ``"train"``, ``"val"``, ... (each reader lists its ``splits``).
        **options: see :class:`FolderDataset` (``transform``, ``pipeline``, ``labelled_fraction``, ``split_file``,
            ``subset``, ``unseen``, ``unseen_mode``, ``verify``, ``seed``, ...) and the reader's own options.
    """
    if root is None:
        root = os.environ.get("FASTSEG_DATASETS")
        if not root:
            raise ValueError(
                f"build_dataset({name!r}): give root= or set FASTSEG_DATASETS to the folder holding the datasets"
            )
    return dataset_class(name)(root, split, **options)
