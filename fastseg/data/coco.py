"""COCO panoptic and COCO instance files for the shapes world, and a checked reader of COCO panoptic files.

Layout written under ``out_dir`` for a split ``S``::

    images/S/000000.png          the RGB image (uint8, un-normalised)
    panoptic_S/000000.png        COCO panoptic PNG: segment id = R + 256 G + 256^2 B, 0 = void
    panoptic_S.json              {"images", "annotations": [{"file_name", "image_id", "segments_info"}], "categories"}
    instances_S.json             {"images", "annotations": [{"segmentation": RLE, "area", "bbox", "iscrowd"}], ...}

Category ids are ``class_id + 1`` (COCO starts at 1); ``categories`` carry ``isthing`` and the palette colour.
Segment ids in the PNG are ``(class_id + 1) * label_divisor + instance_id`` (stuff instance 0), so they are
unique per image and never 0. Ignore pixels (the boundary band, unnameable slivers) are void (0). Instance files
list the thing instances only (as COCO's instance files do), each mask being every pixel with the instance's id.

`read_coco_panoptic` reads such files (or any COCO panoptic pair) back as fastseg panoptic maps
(``class * label_divisor + instance``, -1 void), checking what panopticapi checks: every PNG id must be listed in
``segments_info``, every listed segment must have pixels, categories must be known; a crowd segment on a stuff
category is refused (COCO marks crowd only on things). `panoptic_from_instances` merges instance annotations into
one panoptic map and refuses overlapping segments, as panopticapi's detection-to-panoptic converter does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .shapes import LABEL_DIVISOR, VOID, ShapesDataset, unnormalize

__all__ = ["panoptic_from_instances", "read_coco_panoptic", "write_coco_instances", "write_coco_panoptic"]


def _categories(dataset: ShapesDataset, things_only: bool = False) -> list[dict[str, Any]]:
    cats = []
    for cid, name in enumerate(dataset.class_names):
        is_thing = cid in dataset.thing_classes
        if things_only and not is_thing:
            continue
        cats.append(
            {
                "id": cid + 1,
                "name": name,
                "supercategory": "thing" if is_thing else "stuff",
                "isthing": int(is_thing),
                "color": [int(c) for c in dataset.palette[cid]],
            }
        )
    return cats


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _image_record(dataset: ShapesDataset, index: int, out_dir: Path) -> dict[str, Any]:
    from PIL import Image

    h, w = dataset.config.image_size
    name = f"{index:06d}.png"
    path = out_dir / "images" / dataset.split / name
    if not path.exists():
        sample = dataset[index]
        rgb = (unnormalize(sample["image"], dataset.mean, dataset.std) * 255).round().byte().permute(1, 2, 0).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
    return {"id": index + 1, "file_name": f"{dataset.split}/{name}", "height": h, "width": w}


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (fastseg shapes --overwrite) to replace it")


def write_coco_panoptic(
    dataset: ShapesDataset, out_dir: str | os.PathLike, n: int | None = None, overwrite: bool = False
) -> Path:
    """Write the first ``n`` samples (default: all) as COCO panoptic PNGs + JSON; returns the JSON path."""
    from PIL import Image

    out = Path(out_dir)
    json_path = out / f"panoptic_{dataset.split}.json"
    _refuse_existing(json_path, overwrite)
    png_dir = out / f"panoptic_{dataset.split}"
    png_dir.mkdir(parents=True, exist_ok=True)
    count = len(dataset) if n is None else min(int(n), len(dataset))
    images, annotations = [], []
    for index in range(count):
        sample = dataset[index]
        mask, inst = sample["mask"].numpy(), sample["instances"].numpy()
        valid = mask != dataset.ignore_index
        seg = np.where(valid, (mask + 1) * LABEL_DIVISOR + np.where(np.isin(mask, dataset.thing_classes), inst, 0), 0)
        ids, areas = np.unique(seg[seg > 0], return_counts=True)
        segments = []
        for sid, area in zip(ids.tolist(), areas.tolist()):
            ys, xs = np.nonzero(seg == sid)
            segments.append(
                {
                    "id": sid,
                    "category_id": sid // LABEL_DIVISOR,
                    "area": area,
                    "iscrowd": 0,
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                }
            )
        rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], axis=-1).astype(np.uint8)
        name = f"{index:06d}.png"
        Image.fromarray(rgb).save(png_dir / name)
        images.append(_image_record(dataset, index, out))
        annotations.append({"image_id": index + 1, "file_name": name, "segments_info": segments})
    _write_json_atomically(
        json_path, {"images": images, "annotations": annotations, "categories": _categories(dataset)}
    )
    return json_path


def write_coco_instances(
    dataset: ShapesDataset, out_dir: str | os.PathLike, n: int | None = None, overwrite: bool = False
) -> Path:
    """Write the thing instances of the first ``n`` samples as a COCO instance JSON with RLE masks."""
    from pycocotools import mask as mask_utils

    out = Path(out_dir)
    json_path = out / f"instances_{dataset.split}.json"
    _refuse_existing(json_path, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    count = len(dataset) if n is None else min(int(n), len(dataset))
    images, annotations = [], []
    for index in range(count):
        sample = dataset[index]
        inst, classes = sample["instances"].numpy(), sample["instance_classes"].numpy()
        for iid in [i for i in np.unique(inst).tolist() if i > 0]:
            rle = mask_utils.encode(np.asfortranarray((inst == iid).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(classes[iid - 1]) + 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        images.append(_image_record(dataset, index, out))
    _write_json_atomically(
        json_path, {"images": images, "annotations": annotations, "categories": _categories(dataset, things_only=True)}
    )
    return json_path


def read_coco_panoptic(
    json_path: str | os.PathLike, png_dir: str | os.PathLike | None = None, label_divisor: int = LABEL_DIVISOR
) -> Iterator[dict[str, Any]]:
    """Yield per image ``image_id``, ``file_name``, ``panoptic`` (H, W) int64 fastseg ids and ``crowd`` (the set
    of panoptic ids that are crowd regions). Class ids are the positions of the categories sorted by id."""
    from PIL import Image

    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    png_dir = Path(png_dir) if png_dir is not None else json_path.with_suffix("")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    is_thing = {c["id"]: bool(c.get("isthing", 1)) for c in categories}
    for ann in data["annotations"]:
        image = ann["image_id"]
        with Image.open(png_dir / ann["file_name"]) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
        seg = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        pan = np.full(seg.shape, VOID, np.int64)
        present = set(np.unique(seg).tolist()) - {0}
        listed = set()
        crowd = set()
        instance = 0
        for info in ann["segments_info"]:
            sid, cat = info["id"], info["category_id"]
            if cat not in contiguous:
                raise ValueError(f"image {image}: segment {sid} has unknown category {cat}")
            if sid not in present:
                raise ValueError(
                    f"image {image}: segment {sid} is listed in the JSON but has no pixel in the PNG "
                    "(zero-area segment)"
                )
            if info.get("iscrowd", 0) and not is_thing[cat]:
                raise ValueError(
                    f"image {image}: crowd segment {sid} is on stuff category {cat}; COCO marks crowd only on things"
                )
            listed.add(sid)
            if is_thing[cat]:
                instance += 1
                if instance >= label_divisor:
                    raise ValueError(f"image {image}: more than {label_divisor - 1} thing segments")
                pid = contiguous[cat] * label_divisor + instance
            else:
                pid = contiguous[cat] * label_divisor
            pan[seg == sid] = pid
            if info.get("iscrowd", 0):
                crowd.add(pid)
        unlisted = sorted(present - listed)
        if unlisted:
            raise ValueError(f"image {image}: segment ids {unlisted[:5]} are in the PNG but not in the JSON")
        yield {"image_id": image, "file_name": ann["file_name"], "panoptic": pan, "crowd": crowd}


def panoptic_from_instances(
    annotations: Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    categories: Mapping[int, int],
    label_divisor: int = LABEL_DIVISOR,
) -> np.ndarray:
    """Merge COCO instance annotations (RLE or polygon ``segmentation``) of one image into a fastseg panoptic map.

    ``categories`` maps COCO category id -> class id. Overlapping segments are refused (naming both annotation
    ids), as panopticapi's converter refuses them; crowd annotations are skipped (they are not segments).
    """
    from pycocotools import mask as mask_utils

    pan = np.full((height, width), VOID, np.int64)
    owner = np.zeros((height, width), np.int64)  # annotation id owning each pixel, 0 = none
    instance = 0
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        if ann["category_id"] not in categories:
            raise ValueError(f"annotation {ann.get('id')}: unknown category {ann['category_id']}")
        seg = ann["segmentation"]
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg, list) else seg
        if isinstance(rle, list):
            rle = mask_utils.merge(rle)
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, height, width)
        mask = mask_utils.decode(rle).astype(bool)
        clash = mask & (owner > 0)
        if clash.any():
            other = int(owner[clash][0])
            raise ValueError(
                f"annotation {ann.get('id')} overlaps annotation {other} on {int(clash.sum())} pixels; "
                "panoptic segments must not overlap"
            )
        instance += 1
        owner[mask] = ann.get("id", instance)
        pan[mask] = categories[ann["category_id"]] * label_divisor + instance
    return pan
