"""Tiny copies of the real datasets, written by the tests in each real on-disk layout, and an oracle model.

Every fixture image is painted from a *paint map* of 8 x 8-pixel blocks, each block one of at most eight classes,
with that class's *code colour*: a corner of the RGB cube (0 or 255 per channel). The oracle model reads each pixel's
colour back, thresholding every channel at the middle, and answers the class of that corner. A pixel interpolated
from neighbours keeps the corner of the neighbour that weighs more than half, so the oracle stays exact through
the bilinear resizes and flips of every evaluation mode used here: it predicts the ground truth wherever the
ground truth is labelled, and an evaluation that loses, shifts or mirrors pixels scores below mIoU 1.0.

The label files follow the real encodings: ADE20K's 0 = other, Cityscapes labelIds / labelTrainIds, VOC palette PNGs
with a 255 border, SBD MATLAB structs, COCO-Stuff raw ids and train ids, COCO panoptic RGB-encoded segment PNGs with
their JSON, COCO instance polygons and RLE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fastseg.data.datasets._coco import COCO_THING_CLASSES, COCO_THING_IDS
from fastseg.data.datasets.cityscapes import LABEL_ID_TO_TRAIN_ID
from fastseg.data.datasets.voc import voc_palette
from fastseg.models._base import SegmentationModel
from fastseg.registry import PretrainedCfg

BLOCK = 8
CODE_COLOURS = np.array([[255 * (k & 1), 255 * ((k >> 1) & 1), 255 * ((k >> 2) & 1)] for k in range(8)], np.uint8)

# The 53 stuff categories of COCO panoptic (id, name), as in panoptic_{train,val}2017.json.
PANOPTIC_STUFF = [
    (92, "banner"), (93, "blanket"), (95, "bridge"), (100, "cardboard"), (107, "counter"), (109, "curtain"),
    (112, "door-stuff"), (118, "floor-wood"), (119, "flower"), (122, "fruit"), (125, "gravel"), (128, "house"),
    (130, "light"), (133, "mirror-stuff"), (138, "net"), (141, "pillow"), (144, "platform"), (145, "playingfield"),
    (147, "railroad"), (148, "river"), (149, "road"), (151, "roof"), (154, "sand"), (155, "sea"), (156, "shelf"),
    (159, "snow"), (161, "stairs"), (166, "tent"), (168, "towel"), (171, "wall-brick"), (175, "wall-stone"),
    (176, "wall-tile"), (177, "wall-wood"), (178, "water-other"), (180, "window-blind"), (181, "window-other"),
    (184, "tree-merged"), (185, "fence-merged"), (186, "ceiling-merged"), (187, "sky-other-merged"),
    (188, "cabinet-merged"), (189, "table-merged"), (190, "floor-other-merged"), (191, "pavement-merged"),
    (192, "mountain-merged"), (193, "grass-merged"), (194, "dirt-merged"), (195, "paper-merged"),
    (196, "food-other-merged"), (197, "building-other-merged"), (198, "rock-merged"), (199, "wall-other-merged"),
    (200, "rug-merged"),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Painting helpers


def block_map(rng: np.random.Generator, h: int, w: int, classes: list[int]) -> np.ndarray:
    """(h, w) int64 map of 8 x 8 blocks, each block a class drawn from ``classes`` (every class appears)."""
    bh, bw = h // BLOCK, w // BLOCK
    blocks = rng.choice(classes, size=(bh, bw))
    blocks.flat[: len(classes)] = rng.permutation(classes)
    return np.kron(blocks, np.ones((BLOCK, BLOCK), np.int64)).astype(np.int64)


def paint(paint_map: np.ndarray, classes: list[int]) -> np.ndarray:
    """(h, w, 3) uint8 image: each class in its code colour (the oracle's table is ``classes``)."""
    code = {c: k for k, c in enumerate(classes)}
    lut = np.zeros(max(int(paint_map.max()), max(classes)) + 1, np.int64)
    for c, k in code.items():
        lut[c] = k
    return CODE_COLOURS[lut[paint_map]]


def save_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=100, subsampling=0)


def save_png(path: Path, array: np.ndarray, mode: str | None = None, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8), mode="L") if mode in ("L", "P") else Image.fromarray(array)
    if mode == "P":
        img = img.convert("P")
        img.putpalette(palette.astype(np.uint8).ravel().tolist())
    img.save(path)


def border(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels within ``width`` of a different label (VOC's void border around objects)."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    out = edge.copy()
    for _ in range(width - 1):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def ignore_blocks(rng: np.random.Generator, paint_map: np.ndarray, fraction: float = 0.15) -> np.ndarray:
    """A block-aligned boolean map of about ``fraction`` of the blocks (the fixture's unlabelled regions)."""
    bh, bw = paint_map.shape[0] // BLOCK, paint_map.shape[1] // BLOCK
    chosen = rng.random((bh, bw)) < fraction
    return np.kron(chosen, np.ones((BLOCK, BLOCK), bool))


class Fixture(dict):
    """A written dataset: ``root``, ``classes`` (the oracle's code table), ``num_classes`` and per-split
    ``expected`` ground truth {key: (H, W) int64 after mapping} plus anything a test wants to check."""

    @property
    def root(self) -> Path:
        return self["root"]


# ---------------------------------------------------------------------------------------------------------------
# Writers, one per layout


def write_ade20k(base: Path, seed: int = 0) -> Fixture:
    rng = np.random.default_rng(seed)
    root = base / "ADEChallengeData2016"
    classes = [0, 4, 12, 149]  # wall, tree, person, flag (after reduce-zero-label)
    expected: dict[str, dict[str, np.ndarray]] = {}
    for split, sub, prefix, n in (("train", "training", "ADE_train", 3), ("val", "validation", "ADE_val", 2)):
        expected[split] = {}
        for i in range(1, n + 1):
            key = f"{prefix}_{i:08d}"
            pm = block_map(rng, 64, 96, classes)
            gt = np.where(ignore_blocks(rng, pm), 255, pm)
            raw = np.where(gt == 255, 0, gt + 1)  # 0 = "other"; classes stored 1..150
            save_jpeg(root / "images" / sub / f"{key}.jpg", paint(pm, classes))
            save_png(root / "annotations" / sub / f"{key}.png", raw, "L")
            expected[split][key] = gt
    return Fixture(root=base, classes=classes, num_classes=150, expected=expected)


CITYSCAPES_TRAIN_TO_LABEL = {int(t): int(i) for i, t in enumerate(LABEL_ID_TO_TRAIN_ID[:34]) if t != 255}


def write_cityscapes(base: Path, seed: int = 0) -> Fixture:
    rng = np.random.default_rng(seed)
    root = base / "cityscapes"
    classes = [0, 2, 10, 13, 18]  # road, building, sky, car, bicycle
    not_evaluated = [0, 1, 4, 9, 14, 29, 30]  # unlabeled, ego vehicle, static, parking, guard rail, caravan, trailer
    expected: dict[str, dict[str, np.ndarray]] = {}
    layout = {
        "train": [("aachen", 0, 19), ("aachen", 0, 20), ("bochum", 0, 313)],
        "val": [("frankfurt", 0, 294), ("lindau", 0, 19)],
    }
    for split, frames in layout.items():
        expected[split] = {}
        for j, (city, seq, frame) in enumerate(frames):
            key = f"{city}_{seq:06d}_{frame:06d}"
            pm = block_map(rng, 64, 128, classes)
            ignore = ignore_blocks(rng, pm)
            label_ids = np.vectorize(CITYSCAPES_TRAIN_TO_LABEL.get)(pm)
            label_ids[ignore] = rng.choice(not_evaluated, size=int(ignore.sum()))
            gt = np.where(ignore, 255, pm)
            save_png(root / "leftImg8bit" / split / city / f"{key}_leftImg8bit.png", paint(pm, classes))
            gt_dir = root / "gtFine" / split / city
            save_png(gt_dir / f"{key}_gtFine_labelIds.png", label_ids, "L")
            save_png(gt_dir / f"{key}_gtFine_instanceIds.png", label_ids, "L")
            save_png(gt_dir / f"{key}_gtFine_color.png", np.zeros((*pm.shape, 3), np.uint8))
            (gt_dir / f"{key}_gtFine_polygons.json").write_text(
                json.dumps({"imgHeight": 64, "imgWidth": 128, "objects": []})
            )
            if split == "val" and j == 0:  # converted train ids for one image: preferred over labelIds
                save_png(gt_dir / f"{key}_gtFine_labelTrainIds.png", gt, "L")
            expected[split][key] = gt
    return Fixture(root=base, classes=classes, num_classes=19, expected=expected)


def write_voc(base: Path, seed: int = 0, sbd: str = "mat") -> Fixture:
    """VOC2012 + SBD. ``sbd="mat"``: SBD's cls/*.mat and lists; ``"png"``: mmseg's SegmentationClassAug PNGs."""
    rng = np.random.default_rng(seed)
    voc = base / "VOCdevkit" / "VOC2012"
    classes = [0, 1, 8, 15, 20]  # background, aeroplane, cat, person, tvmonitor
    voc_train, voc_val = ["2007_000032", "2007_000039"], ["2007_000033", "2007_000042"]
    sbd_train, sbd_val = ["2008_000002", "2008_000003", "2007_000033"], ["2008_000008"]
    palette = voc_palette(256)
    expected: dict[str, np.ndarray] = {}
    for key in sorted(set(voc_train + voc_val + sbd_train + sbd_val)):
        pm = block_map(rng, 64, 96, classes)
        save_jpeg(voc / "JPEGImages" / f"{key}.jpg", paint(pm, classes))
        if key in voc_train + voc_val:
            gt = np.where(border(pm), 255, pm)  # VOC draws a void border around every object
            save_png(voc / "SegmentationClass" / f"{key}.png", gt, "P", palette)
            save_png(voc / "SegmentationObject" / f"{key}.png", gt, "P", palette)
        else:
            gt = pm  # SBD has no border
        expected[key] = gt
        if key in sbd_train + sbd_val and sbd == "mat":
            from scipy.io import savemat

            cls = base / "VOCdevkit" / "VOCaug" / "dataset" / "cls"
            cls.mkdir(parents=True, exist_ok=True)
            savemat(
                cls / f"{key}.mat",
                {
                    "GTcls": {
                        "Segmentation": pm.astype(np.uint8),
                        "Boundaries": np.zeros((21, 1), object),
                        "CategoriesPresent": np.unique(pm[pm > 0]).astype(np.uint8),
                    }
                },
            )
        if sbd == "png" and key not in voc_val:
            save_png(voc / "SegmentationClassAug" / f"{key}.png", gt, "L")
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(voc_train) + "\n")
    (sets / "val.txt").write_text("\n".join(voc_val) + "\n")
    (sets / "trainval.txt").write_text("\n".join(sorted(voc_train + voc_val)) + "\n")
    if sbd == "mat":
        dataset = base / "VOCdevkit" / "VOCaug" / "dataset"
        (dataset / "train.txt").write_text("\n".join(sbd_train) + "\n")
        (dataset / "val.txt").write_text("\n".join(sbd_val) + "\n")
    train_aug = sorted(set(voc_train + sbd_train + sbd_val) - set(voc_val))
    return Fixture(
        root=base,
        classes=classes,
        num_classes=21,
        expected=expected,
        train_aug=train_aug,
        splits={"train": voc_train, "val": voc_val},
    )


def write_coco_stuff(base: Path, seed: int = 0) -> Fixture:
    from fastseg.data.datasets.coco_stuff import COCO_STUFF_171_CLASSES

    rng = np.random.default_rng(seed)
    root = base / "coco_stuff164k"
    names = ["person", "cow", "banner", "grass", "wall-concrete", "sky-other"]
    classes = [COCO_STUFF_171_CLASSES.index(n) for n in names]
    category_of = {i: cid for i, cid in enumerate(list(COCO_THING_IDS) + list(range(92, 183)))}
    expected: dict[str, dict[str, np.ndarray]] = {}
    for split, ids, kind in (("train", [9, 25, 30], "trainIds"), ("val", [139, 285], "raw")):
        expected[split] = {}
        for image_id in ids:
            key = f"{image_id:012d}"
            pm = block_map(rng, 64, 96, classes)
            gt = np.where(ignore_blocks(rng, pm), 255, pm)
            save_jpeg(root / "images" / f"{split}2017" / f"{key}.jpg", paint(pm, classes))
            if kind == "trainIds":
                save_png(root / "annotations" / f"{split}2017" / f"{key}_labelTrainIds.png", gt, "L")
            else:
                raw = np.vectorize(lambda v: 255 if v == 255 else category_of[int(v)] - 1)(gt)
                save_png(root / "annotations" / f"{split}2017" / f"{key}.png", raw, "L")
            expected[split][key] = gt
    return Fixture(root=root, classes=classes, num_classes=171, expected=expected, names=names)


def panoptic_categories() -> list[dict[str, Any]]:
    things = [
        {"id": cid, "name": name, "supercategory": "thing", "isthing": 1, "color": [int(v) for v in col]}
        for cid, name, col in zip(
            COCO_THING_IDS, COCO_THING_CLASSES, np.random.default_rng(1).integers(0, 256, (80, 3))
        )
    ]
    stuff = [
        {"id": cid, "name": name, "supercategory": "stuff", "isthing": 0, "color": [int(v) for v in col]}
        for (cid, name), col in zip(PANOPTIC_STUFF, np.random.default_rng(2).integers(0, 256, (53, 3)))
    ]
    return things + stuff


def id2rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def write_coco_panoptic(base: Path, seed: int = 0) -> Fixture:
    """COCO panoptic: stuff blocks with rectangular thing instances (block-aligned) and one crowd region per image.

    Contiguous classes: person 0, car 2, cow 19 (unseen in ZSP), road 100 (unseen), sky-other-merged 119 (unseen),
    wall-brick 109, bridge 82. Train image 0 holds no unseen class, so the ZSP training split keeps exactly that image.
    """
    rng = np.random.default_rng(seed)
    root = base / "coco"
    categories = panoptic_categories()
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    expected: dict[str, dict[str, Any]] = {}
    paint_classes = [0, 2, 19, 82, 100, 109, 119]
    stuff_sets = {"train": [[109, 82], [100, 119], [109, 100]], "val": [[100, 119], [109, 119]]}
    thing_sets = {"train": [[0, 2], [0, 19], [2, 2]], "val": [[19, 0], [2, 0]]}
    for split in ("train", "val"):
        images, annotations = [], []
        expected[split] = {}
        for n, (stuffs, things) in enumerate(zip(stuff_sets[split], thing_sets[split])):
            image_id = 1000 * (split == "val") + 36 + n
            key = f"{image_id:012d}"
            h, w = 64, 96
            sem = block_map(rng, h, w, stuffs)
            ids = np.zeros((h, w), np.int64)
            segments = []
            next_id = 3_000_001 + 7919 * n  # ids that use all three colour channels
            for cls in sorted(set(stuffs)):
                region = sem == cls
                segments.append(
                    {
                        "id": next_id,
                        "category_id": categories[cls]["id"],
                        "iscrowd": 0,
                        "area": int(region.sum()),
                        "bbox": [0, 0, w, h],
                    }
                )
                ids[region] = next_id
                next_id += 1
            instance_classes = []
            for k, cls in enumerate(things):
                y0, x0 = 8 + 16 * (k % 2), 8 + 40 * k
                box = (slice(y0, y0 + 24), slice(x0, x0 + 32))
                sem[box] = cls
                ids[box] = next_id
                segments.append(
                    {
                        "id": next_id,
                        "category_id": categories[cls]["id"],
                        "iscrowd": 0,
                        "area": 24 * 32,
                        "bbox": [x0, y0, 32, 24],
                    }
                )
                instance_classes.append(cls)
                next_id += 1
            crowd = (slice(48, 56), slice(80, 96))  # a crowd of people in the corner
            sem[crowd] = 0
            ids[crowd] = next_id
            segments.append({"id": next_id, "category_id": 1, "iscrowd": 1, "area": 128, "bbox": [80, 48, 16, 8]})
            void = (slice(0, 8), slice(0, 16))
            ids[void] = 0
            gt = sem.copy()
            gt[void] = 255
            file_name = f"{key}.jpg"
            save_jpeg(root / f"{split}2017" / file_name, paint(sem, paint_classes))
            save_png(root / f"panoptic_{split}2017" / f"{key}.png", id2rgb(ids))
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "height": h,
                    "width": w,
                    "license": 1,
                    "coco_url": "",
                    "date_captured": "",
                    "flickr_url": "",
                }
            )
            annotations.append({"image_id": image_id, "file_name": f"{key}.png", "segments_info": segments})
            expected[split][key] = {"mask": gt, "ids": ids, "instance_classes": instance_classes, "segments": segments}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"panoptic_{split}2017.json").write_text(
            json.dumps(
                {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
            )
        )
    return Fixture(root=root, classes=paint_classes, num_classes=133, expected=expected, contiguous=contiguous)


def rle_uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major flattening, starting with a run of zeros."""
    flat = mask.T.ravel().astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def write_coco_instances(base: Path) -> Fixture:
    """Polygons (rectangles and a triangle) plus a crowd RLE, overlapping so the painting order matters."""
    root = base / "coco"
    categories = [
        {"id": cid, "name": name, "supercategory": "x"} for cid, name in zip(COCO_THING_IDS, COCO_THING_CLASSES)
    ]
    h, w = 64, 96
    expected: dict[str, dict[str, Any]] = {}
    ann_id = 1
    for split, image_ids in (("train", [42, 73, 74]), ("val", [139])):
        images, annotations = [], []
        expected[split] = {}
        for n, image_id in enumerate(image_ids):
            key = f"{image_id:012d}"
            file_name = f"{key}.jpg"
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            if split == "train" and n == 2:  # an image without annotations: dropped from training
                save_jpeg(root / f"{split}2017" / file_name, np.zeros((h, w, 3), np.uint8))
                continue
            big = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 3,
                "iscrowd": 0,  # car
                "segmentation": [[8.0, 8.0, 72.0, 8.0, 72.0, 56.0, 8.0, 56.0]],
                "area": 64.0 * 48,
                "bbox": [8, 8, 64, 48],
            }
            small = {
                "id": ann_id + 1,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,  # person, on the car
                "segmentation": [[24.0, 16.0, 40.0, 16.0, 40.0, 40.0, 24.0, 40.0]],
                "area": 16.0 * 24,
                "bbox": [24, 16, 16, 24],
            }
            crowd_mask = np.zeros((h, w), bool)
            crowd_mask[48:64, 80:96] = True
            crowd = {
                "id": ann_id + 2,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": rle_uncompressed(crowd_mask),
                "area": float(crowd_mask.sum()),
                "bbox": [80, 48, 16, 16],
            }
            ann_id += 3
            annotations += [small, big, crowd]  # small first in the JSON: the reader must paint big first
            save_jpeg(root / f"{split}2017" / file_name, np.zeros((h, w, 3), np.uint8))
            expected[split][key] = {"crowd_mask": crowd_mask}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(
                {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
            )
        )
    return Fixture(root=root, num_classes=80, expected=expected)


# ---------------------------------------------------------------------------------------------------------------
# The oracle


class CodeOracle(SegmentationModel):
    """Reads the code colour of each pixel back to its class (see the module docstring); logits at input size."""

    def __init__(self, classes: list[int], num_classes: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.pretrained_cfg = PretrainedCfg(num_classes=num_classes, output_stride=1, divisible_by=1)
        self.register_buffer("lut", torch.tensor(classes + [classes[0]] * (8 - len(classes))))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # so the engine finds a device

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images * self.std + self.mean
        bits = (rgb > 0.5).long()
        code = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]
        cls = self.lut[code]
        return torch.nn.functional.one_hot(cls, self.num_classes).permute(0, 3, 1, 2).float() * 10.0


@pytest.fixture
def oracle_for():
    def make(fixture: Fixture) -> CodeOracle:
        return CodeOracle(fixture["classes"], fixture["num_classes"]).eval()

    return make


class _Writers:
    ade20k = staticmethod(write_ade20k)
    cityscapes = staticmethod(write_cityscapes)
    voc = staticmethod(write_voc)
    coco_stuff = staticmethod(write_coco_stuff)
    coco_panoptic = staticmethod(write_coco_panoptic)
    coco_instances = staticmethod(write_coco_instances)
    paint = staticmethod(paint)
    block_map = staticmethod(block_map)
    save_png = staticmethod(save_png)
    save_jpeg = staticmethod(save_jpeg)
    CODE_COLOURS = CODE_COLOURS
    CodeOracle = CodeOracle


@pytest.fixture
def writers() -> type[_Writers]:
    """The fixture writers, for tests that need a fresh (e.g. to-be-corrupted) copy in their own tmp_path."""
    return _Writers


@pytest.fixture(scope="session")
def datasets_on_disk(tmp_path_factory) -> dict[str, Fixture]:
    """One copy of every fixture dataset, written once per session (tests must not modify them)."""
    base = tmp_path_factory.mktemp("datasets")
    return {
        "ade20k": write_ade20k(base / "ade"),
        "cityscapes": write_cityscapes(base / "cs"),
        "voc": write_voc(base / "voc"),
        "coco_stuff": write_coco_stuff(base / "stuff"),
        "coco_panoptic": write_coco_panoptic(base / "pan"),
        "coco_instances": write_coco_instances(base / "inst"),
    }
