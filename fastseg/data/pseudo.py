"""Pseudo-mask folders: label PNGs written by `fastseg semples pseudo-masks`, read back to train a segmenter.

A folder holds ``meta.json`` (the world it was made from: ``split``, ``length``, ``seed``, ``config``
(`ShapesConfig` fields), ``class_names``, ``num_classes``, ``ignore_index``, ``image_size``, how the masks were
made) and one ``<index:06d>.png`` per image: uint8 class ids, ``ignore_index`` where undecided. `PseudoMaskDataset`
pairs each PNG with the world's image of that index, and checks every PNG when it is built (size, ids), so a
folder that does not fit the images is a clear error before any training step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .shapes import ShapesConfig, ShapesDataset

__all__ = ["META_FILE", "PseudoMaskDataset", "mask_file_name", "read_meta", "world_config_from_meta"]

META_FILE = "meta.json"


def mask_file_name(index: int) -> str:
    return f"{index:06d}.png"


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a pseudo-mask folder: {META_FILE} is missing (write one with "
            f"`fastseg semples pseudo-masks`)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    for key in ("split", "length", "seed", "config", "num_classes", "ignore_index", "indices"):
        if key not in meta:
            raise ValueError(f"{path} lacks the entry {key!r}")
    return meta


def world_config_from_meta(meta: dict[str, Any]) -> ShapesConfig:
    fields = dict(meta["config"])
    for key in ("stuff_classes", "thing_classes", "unseen_classes", "scale_range", "image_size"):
        if key in fields and isinstance(fields[key], list):
            fields[key] = tuple(fields[key])
    if fields.get("preferred_stuff") is not None:
        fields["preferred_stuff"] = tuple(tuple(p) for p in fields["preferred_stuff"])
    return ShapesConfig(**fields)


class PseudoMaskDataset(Dataset):
    """World images with pseudo-mask labels: samples ``{"image", "mask", "index"}`` for the standard trainer.

    Raises:
        ValueError: no ``meta.json``, a missing PNG, a PNG whose size differs from the images, or a PNG holding an
            id that is neither a class (``< num_classes``) nor ``ignore_index``; the message names the file.
    """

    def __init__(self, folder: str | os.PathLike, num_classes: int | None = None) -> None:
        self.folder = Path(folder)
        meta = read_meta(self.folder)
        self.meta = meta
        self.num_classes = int(meta["num_classes"])
        self.ignore_index = int(meta["ignore_index"])
        self.class_names = tuple(meta.get("class_names") or ())
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"the pseudo masks in {folder} have {self.num_classes} classes but the model has "
                f"{num_classes}; build the model with num_classes={self.num_classes}"
            )
        config = world_config_from_meta(meta)
        self.world = ShapesDataset(meta["split"], length=int(meta["length"]), config=config, seed=int(meta["seed"]))
        self.indices = [int(i) for i in meta["indices"]]
        height, width = config.image_size
        self.masks: list[np.ndarray] = []
        for index in self.indices:
            path = self.folder / mask_file_name(index)
            if not path.is_file():
                raise ValueError(f"pseudo mask {path} is missing (meta.json lists index {index})")
            with Image.open(path) as img:
                if img.mode not in ("L", "P"):
                    raise ValueError(f"pseudo mask {path} must be a single-channel label PNG, got mode {img.mode}")
                mask = np.asarray(img, dtype=np.uint8).copy()
            if mask.shape != (height, width):
                raise ValueError(
                    f"pseudo mask {path} is {mask.shape[1]}x{mask.shape[0]} (W x H) but the images are {width}x{height}"
                )
            bad = (mask != self.ignore_index) & (mask >= self.num_classes)
            if bad.any():
                raise ValueError(
                    f"pseudo mask {path} holds id {int(mask[bad][0])}, which is neither a class id in "
                    f"[0, {self.num_classes}) nor the ignore index {self.ignore_index}"
                )
            self.masks.append(mask)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        index = self.indices[j]
        return {
            "image": self.world[index]["image"],
            "mask": torch.from_numpy(self.masks[j].astype(np.int64)),
            "index": index,
        }
