"""COCO panoptic / instance files of the shapes world: round trips through our reader and pycocotools, and the
bad inputs of the issue (unknown ids, zero-area segments, crowd on stuff, overlapping segments)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastseg.data.coco import (
    panoptic_from_instances,
    read_coco_panoptic,
    write_coco_instances,
    write_coco_panoptic,
)
from fastseg.data.shapes import (
    ShapesConfig,
    ShapesDataset,
    panoptic_map,
    zero_shot_config,
)


@pytest.fixture(scope="module")
def dataset():
    return ShapesDataset("val", length=6, config=ShapesConfig(image_size=32), panoptic=True)


@pytest.fixture(scope="module")
def panoptic_files(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    return out, write_coco_panoptic(dataset, out)


def test_panoptic_sample_encoding(dataset):
    s = dataset[0]
    pan = s["panoptic"]
    assert torch.equal(pan == -1, s["mask"] == 255)
    valid = pan >= 0
    assert torch.equal(pan[valid] // 1000, s["mask"][valid])
    stuff = valid & torch.isin(s["mask"], torch.tensor(dataset.stuff_classes))
    assert (pan[stuff] % 1000 == 0).all() and torch.equal(pan[valid & ~stuff] % 1000, s["instances"][valid & ~stuff])
    assert torch.equal(panoptic_map(s["mask"], s["instances"]), pan)


def test_default_samples_have_no_panoptic_key_and_are_unchanged():
    plain = ShapesDataset("val", length=2, config=ShapesConfig(image_size=32))[1]
    with_pan = ShapesDataset("val", length=2, config=ShapesConfig(image_size=32), panoptic=True)[1]
    assert "panoptic" not in plain
    for key in plain:
        if isinstance(plain[key], torch.Tensor):
            assert torch.equal(plain[key], with_pan[key]), key


def test_zero_shot_world_has_unseen_stuff():
    cfg = zero_shot_config(image_size=32)
    assert "snow" in cfg.stuff_classes and cfg.class_names.index("snow") in cfg.unseen_ids
    assert cfg.class_names.index("snow") in cfg.stuff_ids
    ds = ShapesDataset("train", length=40, config=cfg)
    snow = cfg.class_names.index("snow")
    assert any((ds[i]["mask"] == snow).any() for i in range(40))
    excluded = ShapesDataset("train", length=40, config=cfg, unseen="exclude")
    assert not any(torch.isin(excluded[i]["mask"], torch.tensor(cfg.unseen_ids)).any() for i in range(40))


def test_panoptic_round_trip(dataset, panoptic_files):
    out, json_path = panoptic_files
    data = json.loads(json_path.read_text())
    assert len(data["images"]) == 6 and {c["isthing"] for c in data["categories"]} == {0, 1}
    assert (out / "images" / "val" / "000000.png").exists()
    for record, index in zip(read_coco_panoptic(json_path), range(6)):
        s = dataset[index]
        # thing instances are renumbered 1..n in JSON order; classes, void and the segment partition must agree
        theirs = s["panoptic"].numpy()
        assert np.array_equal(record["panoptic"] < 0, theirs < 0)
        assert np.array_equal(record["panoptic"][theirs >= 0] // 1000, theirs[theirs >= 0] // 1000)
        ours = record["panoptic"]
        pairs = set(zip(ours.ravel().tolist(), theirs.ravel().tolist()))
        assert len(pairs) == len(np.unique(ours)) == len(np.unique(theirs))  # one-to-one segment correspondence
    with pytest.raises(FileExistsError):
        write_coco_panoptic(dataset, out)


def test_instances_json_loads_in_pycocotools(dataset, tmp_path):
    from pycocotools.coco import COCO

    path = write_coco_instances(dataset, tmp_path, n=4)
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 4
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    s = dataset[0]
    mask = coco.annToMask(ann).astype(bool)
    iid = int(np.unique(s["instances"].numpy()[mask])[0])
    assert np.array_equal(mask, s["instances"].numpy() == iid)
    assert ann["category_id"] - 1 == int(s["instance_classes"][iid - 1])
    assert all(c["isthing"] for c in coco.dataset["categories"])


def _copy_with(out, json_path, tmp_path, edit_json=None, edit_png=None):
    data = json.loads(json_path.read_text())
    png_dir = tmp_path / "png"
    png_dir.mkdir()
    for ann in data["annotations"]:
        arr = np.asarray(Image.open(out / json_path.stem / ann["file_name"])).copy()
        if edit_png is not None and ann["image_id"] == 1:
            arr = edit_png(arr)
        Image.fromarray(arr).save(png_dir / ann["file_name"])
    if edit_json is not None:
        edit_json(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path, png_dir


def test_unknown_png_id_is_refused(panoptic_files, tmp_path):
    out, json_path = panoptic_files

    def add_id(arr):
        arr[0, 0] = (7, 0, 0)  # id 7: listed nowhere
        return arr

    path, png_dir = _copy_with(out, json_path, tmp_path, edit_png=add_id)
    with pytest.raises(ValueError, match=r"image 1: segment ids \[7\] are in the PNG but not in the JSON"):
        list(read_coco_panoptic(path, png_dir))


def test_zero_area_and_crowd_on_stuff_and_unknown_category(panoptic_files, tmp_path):
    out, json_path = panoptic_files

    def zero_area(data):
        data["annotations"][0]["segments_info"].append({"id": 99999, "category_id": 1, "area": 0, "iscrowd": 0})

    (tmp_path / "a").mkdir()
    path, png_dir = _copy_with(out, json_path, tmp_path / "a", edit_json=zero_area)
    with pytest.raises(ValueError, match="segment 99999 is listed in the JSON but has no pixel"):
        list(read_coco_panoptic(path, png_dir))

    def crowd_stuff(data):
        info = next(i for i in data["annotations"][0]["segments_info"] if i["category_id"] <= 4)
        info["iscrowd"] = 1

    (tmp_path / "b").mkdir()
    path, png_dir = _copy_with(out, json_path, tmp_path / "b", edit_json=crowd_stuff)
    with pytest.raises(ValueError, match="crowd segment .* is on stuff category"):
        list(read_coco_panoptic(path, png_dir))

    def unknown_cat(data):
        data["annotations"][0]["segments_info"][0]["category_id"] = 500

    (tmp_path / "c").mkdir()
    path, png_dir = _copy_with(out, json_path, tmp_path / "c", edit_json=unknown_cat)
    with pytest.raises(ValueError, match="unknown category 500"):
        list(read_coco_panoptic(path, png_dir))


def test_overlapping_instance_segments_are_refused():
    a = np.zeros((8, 8), np.uint8)
    a[:4, :4] = 1
    b = np.zeros((8, 8), np.uint8)
    b[3:6, 3:6] = 1
    from pycocotools import mask as mask_utils

    anns = [
        {"id": 1, "category_id": 5, "segmentation": mask_utils.encode(np.asfortranarray(a))},
        {"id": 2, "category_id": 5, "segmentation": mask_utils.encode(np.asfortranarray(b))},
    ]
    with pytest.raises(ValueError, match="annotation 2 overlaps annotation 1 on 1 pixels"):
        panoptic_from_instances(anns, 8, 8, {5: 4})
    b[3, 3] = 0
    anns[1]["segmentation"] = mask_utils.encode(np.asfortranarray(b))
    pan = panoptic_from_instances(anns, 8, 8, {5: 4})
    assert set(np.unique(pan).tolist()) == {-1, 4001, 4002}
