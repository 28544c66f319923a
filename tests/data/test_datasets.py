"""The on-disk readers on tiny fixtures in each real layout: class mapping, ignore handling, splits, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastseg.data import build_dataset, list_datasets
from fastseg.data.datasets import dataset_class
from fastseg.registry import PretrainedCfg

SEMANTIC = ["ade20k", "cityscapes", "coco_stuff"]


def test_registry_lists_every_reader():
    assert list_datasets() == ["ade20k", "cityscapes", "coco_instances", "coco_panoptic", "coco_stuff", "voc"]
    with pytest.raises(ValueError, match="unknown dataset 'ade'.*known"):
        build_dataset("ade", "/nowhere", "train")


@pytest.mark.parametrize("name", SEMANTIC)
@pytest.mark.parametrize("split", ["train", "val"])
def test_semantic_labels_are_mapped_exactly(datasets_on_disk, name, split):
    fixture = datasets_on_disk[name]
    ds = build_dataset(name, fixture.root, split, transform=None)
    expected = fixture["expected"][split]
    assert len(ds) == len(expected)
    for j in range(len(ds)):
        sample = ds[j]
        want = expected[ds.record(j).key]
        assert torch.equal(sample["mask"], torch.from_numpy(want)), ds.record(j).label
        present = sorted(set(np.unique(want).tolist()) - {255})
        assert torch.nonzero(sample["image_labels"]).flatten().tolist() == present
        assert sample["image"].shape == (3, *want.shape) and sample["image"].dtype == torch.float32
        assert bool(sample["labelled"]) and sample["index"] == j


@pytest.mark.parametrize("name", list_datasets())
def test_metadata_makes_a_pretrained_cfg(datasets_on_disk, name):
    ds = build_dataset(name, datasets_on_disk[name].root, "val", transform=None)
    fields = ds.pretrained_cfg_fields()
    cfg = PretrainedCfg(
        **{
            k: fields[k]
            for k in ("num_classes", "class_names", "palette", "mean", "std", "ignore_index", "input_size", "dataset")
        }
    )
    assert cfg.num_classes == ds.num_classes == len(ds.class_names) == ds.palette.shape[0]
    assert cfg.ignore_index == 255 and cfg.dataset == name
    assert sorted(fields["stuff_classes"] + fields["thing_classes"]) == list(range(ds.num_classes))


def test_class_tables_match_the_benchmarks():
    ade = dataset_class("ade20k")
    assert ade.class_names[:3] == ("wall", "building", "sky") and ade.class_names[-1] == "flag"
    assert len(ade.class_names) == 150 and ade.palette.shape == (150, 3) and ade.palette[0].tolist() == [120] * 3
    cs = dataset_class("cityscapes")
    assert len(cs.class_names) == 19 and cs.palette[0].tolist() == [128, 64, 128]
    voc = dataset_class("voc")
    assert voc.class_names[0] == "background" and voc.palette[15].tolist() == [192, 128, 128]  # person
    stuff = dataset_class("coco_stuff")
    assert (
        len(stuff.class_names) == 171 and stuff.class_names[80] == "banner" and stuff.thing_classes == tuple(range(80))
    )


def test_cityscapes_prefers_train_ids_and_maps_label_ids(datasets_on_disk):
    fixture = datasets_on_disk["cityscapes"]
    auto = build_dataset("cityscapes", fixture.root, "val", transform=None)
    assert [r.label.name.split("_gtFine_")[1] for r in auto.records] == ["labelTrainIds.png", "labelIds.png"]
    forced = build_dataset("cityscapes", fixture.root, "val", transform=None, label_kind="labelIds")
    assert all(r.label.name.endswith("_labelIds.png") for r in forced.records)
    for j in range(2):  # both encodings give the same 19-class map
        assert torch.equal(auto[j]["mask"], forced[j]["mask"])


def test_voc_palette_pngs_are_read_as_indices_with_border(datasets_on_disk):
    fixture = datasets_on_disk["voc"]
    ds = build_dataset("voc", fixture.root, "val", transform=None)
    with Image.open(ds.records[0].label) as img:
        assert img.mode == "P"  # the real encoding: colours on disk, indices in the file
    mask = ds[0]["mask"]
    assert (mask == 255).any() and set(torch.unique(mask).tolist()) <= {0, 1, 8, 15, 20, 255}


@pytest.mark.parametrize("sbd", ["mat", "png"])
def test_voc_train_aug_from_sbd_mat_or_augmented_pngs(tmp_path, writers, sbd):
    fixture = writers.voc(tmp_path, sbd=sbd)
    ds = build_dataset("voc", fixture.root / "VOCdevkit", "train_aug", transform=None)
    assert [r.key for r in ds.records] == fixture["train_aug"]  # VOC train + SBD train/val - VOC val
    kinds = {r.key: r.label.suffix for r in ds.records}
    if sbd == "mat":
        assert kinds["2008_000002"] == ".mat" and kinds["2007_000032"] == ".png"
    for j, record in enumerate(ds.records):
        assert torch.equal(ds[j]["mask"], torch.from_numpy(fixture["expected"][record.key])), record.label


def test_coco_stuff_zero_shot_ignores_unseen_pixels_in_training(datasets_on_disk):
    fixture = datasets_on_disk["coco_stuff"]
    train = build_dataset("coco_stuff", fixture.root, "train", transform=None, unseen="pading")
    names = [train.class_names[i] for i in train.unseen_classes]
    assert len(names) == 15 and {"cow", "grass", "wall-concrete", "road"} <= set(names)
    assert train.unseen_mode == "ignore" and len(train.seen_classes) == 156
    unseen = torch.tensor(train.unseen_classes)
    for j in range(len(train)):
        want = torch.from_numpy(fixture["expected"]["train"][train.record(j).key])
        got = train[j]["mask"]
        hidden = torch.isin(want, unseen)
        assert hidden.any() and (got[hidden] == 255).all() and torch.equal(got[~hidden], want[~hidden])
    val = build_dataset("coco_stuff", fixture.root, "val", transform=None, unseen="pading")
    assert val.unseen_mode == "keep"  # evaluation scores all 171 classes
    assert torch.equal(val[0]["mask"], torch.from_numpy(fixture["expected"]["val"][val.record(0).key]))


def test_coco_panoptic_classes_segments_and_zero_shot_split(datasets_on_disk):
    fixture = datasets_on_disk["coco_panoptic"]
    val = build_dataset("coco_panoptic", fixture.root, "val", transform=None)
    assert val.num_classes == 133 and len(val.thing_classes) == 80 and val.class_names[80] == "banner"
    for j in range(len(val)):
        want = fixture["expected"]["val"][val.record(j).key]
        sample = val[j]
        assert torch.equal(sample["mask"], torch.from_numpy(want["mask"]))
        classes = sample["instance_classes"][sample["instance_classes"] >= 0].tolist()
        assert classes == want["instance_classes"]  # non-crowd things only, JSON order
        instances = sample["instances"]
        assert int(instances.max()) == len(classes)
        for k, cls in enumerate(classes, start=1):
            assert (sample["mask"][instances == k] == cls).all()
        ids, segments = val.segments(j)
        assert np.array_equal(ids, want["ids"]) and len(segments) == len(want["segments"])
        pan, crowd = val.panoptic_target(j)
        assert len(crowd) == 1 and (pan[ids == 0] == -1).all()
    # The PADing ZSP split: the spec's 14 contiguous ids, and training keeps only images without them.
    train = build_dataset("coco_panoptic", fixture.root, "train", transform=None, unseen="pading")
    assert train.unseen_classes == (19, 23, 28, 29, 36, 51, 76, 83, 97, 99, 100, 116, 119, 125)
    assert train.unseen_mode == "exclude" and [r.key for r in train.records] == ["000000000036"]
    assert len(build_dataset("coco_panoptic", fixture.root, "train", transform=None)) == 3


def test_coco_panoptic_samples_carry_the_panoptic_encoding(datasets_on_disk):
    fixture = datasets_on_disk["coco_panoptic"]
    val = build_dataset("coco_panoptic", fixture.root, "val", transform=None, panoptic=True)
    for j in range(len(val)):
        sample = val[j]
        pan, mask, inst = sample["panoptic"], sample["mask"], sample["instances"]
        ids, segments = val.segments(j)
        crowd = torch.from_numpy(np.isin(ids, [s["id"] for s in segments if s["iscrowd"]]))
        assert crowd.any() and (pan[crowd] == -1).all() and (pan[mask == 255] == -1).all()
        labelled = (mask != 255) & ~crowd
        assert torch.equal(pan[labelled] // 1000, mask[labelled]) and torch.equal(pan[labelled] % 1000, inst[labelled])
    train = build_dataset(
        "coco_panoptic", fixture.root, "train", panoptic=True, pipeline={"scale": (96, 64), "crop_size": (40, 40)}
    )
    torch.manual_seed(0)
    sample = train[1]  # the crowd map follows the resize / crop / flip with the labels
    labelled = sample["panoptic"] >= 0
    assert torch.equal(sample["panoptic"][labelled] // 1000, sample["mask"][labelled])
    assert ((sample["panoptic"] == -1) >= (sample["mask"] == 255)).all()
    with pytest.raises(ValueError, match="panoptic=True needs instance annotations"):
        build_dataset("ade20k", datasets_on_disk["ade20k"].root, "val", panoptic=True)


def test_coco_panoptic_quality_of_the_ground_truth_is_one(datasets_on_disk):
    panoptic = pytest.importorskip("fastseg.metrics.panoptic", reason="PanopticQuality has not landed on main yet")
    ds = build_dataset("coco_panoptic", datasets_on_disk["coco_panoptic"].root, "val", transform=None)
    pq = panoptic.PanopticQuality(things=ds.thing_classes, stuffs=ds.stuff_classes)
    for j in range(len(ds)):
        target, crowd = ds.panoptic_target(j)
        pred = np.where(np.isin(target, list(crowd)), -1, target)
        pq.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], [crowd])
    assert pq.compute()["PQ"] == 1.0


def test_coco_instances_polygons_rle_and_painting_order(datasets_on_disk):
    fixture = datasets_on_disk["coco_instances"]
    train = build_dataset("coco_instances", fixture.root, "train", transform=None)
    assert len(train) == 2  # the image without annotations is dropped from training
    assert len(build_dataset("coco_instances", fixture.root, "train", transform=None, filter_empty=False)) == 3
    sample = train[0]
    classes = sample["instance_classes"][sample["instance_classes"] >= 0].tolist()
    assert classes == [2, 0]  # the car (larger) painted first, the person on top
    masks, mask_classes, crowd = train.instance_masks(0)
    assert mask_classes.tolist() == [0, 2, 0] and crowd.tolist() == [0, 0, 1]
    want_crowd = fixture["expected"]["train"][train.record(0).key]["crowd_mask"]
    assert np.array_equal(masks[2], want_crowd)  # uncompressed RLE decoded column-major
    person = masks[0]
    assert (sample["instances"][torch.from_numpy(person)] == 2).all()
    assert (sample["mask"][torch.from_numpy(person)] == 0).all()
    assert (sample["mask"][torch.from_numpy(want_crowd & ~masks[1])] == 255).all()  # crowd is ignored
    assert (sample["mask"][:4, :4] == 255).all()  # no instance: no background class in the instance task
    assert abs(int(masks[1].sum()) - 64 * 48) <= 64 + 48 + 1  # polygon rasterised to its rectangle
    zsi = build_dataset("coco_instances", fixture.root, "train", transform=None, unseen="pading")
    assert len(zsi.unseen_classes) == 17 and "couch" in [zsi.class_names[i] for i in zsi.unseen_classes]
    assert len(zsi) == 2  # no image holds an unseen class: nothing dropped
    with pytest.raises(ValueError, match="every image contains an unseen class"):  # both hold a person
        build_dataset("coco_instances", fixture.root, "train", transform=None, unseen=["person"])


def test_labelled_fraction_and_split_file(tmp_path, datasets_on_disk):
    root = datasets_on_disk["voc"].root
    full = build_dataset("voc", root, "train_aug", transform=None, labelled_fraction=0.4, seed=3)
    lab = build_dataset("voc", root, "train_aug", transform=None, labelled_fraction=0.4, seed=3, subset="labelled")
    unl = build_dataset("voc", root, "train_aug", transform=None, labelled_fraction=0.4, seed=3, subset="unlabelled")
    assert len(full) == 5 and len(lab) == 2 and len(unl) == 3
    lab_keys = {lab.record(j).key for j in range(len(lab))}
    unl_keys = {unl.record(j).key for j in range(len(unl))}
    assert not lab_keys & unl_keys and len(lab_keys | unl_keys) == 5
    assert all(bool(lab[j]["labelled"]) for j in range(2)) and not any(bool(unl[j]["labelled"]) for j in range(3))
    assert [full.is_labelled(j) for j in range(5)] == [full.record(j).key in lab_keys for j in range(5)]
    other = build_dataset("voc", root, "train_aug", transform=None, labelled_fraction=0.4, seed=4, subset="labelled")
    assert len(other) == 2  # another seed, another (possibly equal) draw of the same size
    # UniMatch's split-file format: "image label" per line.
    split = tmp_path / "labeled.txt"
    split.write_text("JPEGImages/2008_000003.jpg SegmentationClass/2008_000003.png\n2007_000039\n")
    by_file = build_dataset("voc", root, "train_aug", transform=None, split_file=split, subset="labelled")
    assert sorted(by_file.record(j).key for j in range(len(by_file))) == ["2007_000039", "2008_000003"]
    split.write_text("2099_999999\n")
    with pytest.raises(ValueError, match="2099_999999"):
        build_dataset("voc", root, "train_aug", transform=None, split_file=split)


def test_training_pipeline_batches_through_a_dataloader(datasets_on_disk):
    ds = build_dataset(
        "cityscapes", datasets_on_disk["cityscapes"].root, "train", pipeline={"scale": (128, 64), "crop_size": (48, 48)}
    )
    loader = DataLoader(ds, batch_size=3, num_workers=1, generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 48, 48) and batch["mask"].shape == (3, 48, 48)
    labels = batch["mask"][batch["mask"] != 255]
    assert labels.numel() and set(labels.unique().tolist()) <= {0, 2, 10, 13, 18}
    torch.manual_seed(5)
    a = ds[0]
    torch.manual_seed(5)
    b = ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])  # seeded by torch's RNG
    pan = build_dataset(
        "coco_panoptic",
        datasets_on_disk["coco_panoptic"].root,
        "train",
        pipeline={"scale": (96, 64), "crop_size": (32, 32)},
        max_instances=8,
    )
    batch = next(iter(DataLoader(pan, batch_size=3)))
    assert batch["instances"].shape == (3, 32, 32) and batch["instance_classes"].shape == (3, 8)
    for b in range(3):  # instance ids renumbered 1..n after the crop, one class each
        n = int((batch["instance_classes"][b] >= 0).sum())
        assert int(batch["instances"][b].max()) == n


# ---------------------------------------------------------------------------------------------------------------
# Errors, each naming the file and what was expected


def test_missing_folder_names_it(tmp_path, writers):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("ade20k", tmp_path / "nothing", "train")
    fixture = writers.ade20k(tmp_path)
    shutil.rmtree(fixture.root / "ADEChallengeData2016" / "annotations" / "validation")
    with pytest.raises(FileNotFoundError, match=r"missing folder .*annotations/validation.*ADE20K annotations"):
        build_dataset("ade20k", fixture.root, "val")


def test_image_without_label_names_both(tmp_path, writers):
    fixture = writers.cityscapes(tmp_path)
    victim = fixture.root / "cityscapes/gtFine/train/aachen/aachen_000000_000020_gtFine_labelIds.png"
    victim.unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"aachen_000000_000020_leftImg8bit.png has no label; expected "
        r".*aachen_000000_000020_gtFine_labelIds.png",
    ):
        build_dataset("cityscapes", fixture.root, "train")


def test_label_outside_the_class_range(tmp_path, writers):
    fixture = writers.ade20k(tmp_path)
    label = fixture.root / "ADEChallengeData2016/annotations/training/ADE_train_00000001.png"
    raw = np.asarray(Image.open(label)).copy()
    raw[0, 0] = 151
    writers.save_png(label, raw, "L")
    with pytest.raises(
        ValueError,
        match=r"ADE_train_00000001.png: label 151 .* is outside the class range.*"
        r"expected 0 \(other\) or 1..150",
    ):
        build_dataset("ade20k", fixture.root, "train")
    cs = writers.cityscapes(tmp_path / "cs")
    label = cs.root / "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    raw = np.asarray(Image.open(label)).copy()
    raw[3, 3] = 40
    writers.save_png(label, raw, "L")
    ds = build_dataset("cityscapes", cs.root, "val", verify=1)  # only the first file is checked up front ...
    with pytest.raises(ValueError, match=r"lindau_000000_000019_gtFine_labelIds.png: label 40 .*labelIds 0..33"):
        ds[1]  # ... every other one when it is read
    with pytest.raises(ValueError, match="label 40"):
        build_dataset("cityscapes", cs.root, "val", verify=-1)


def test_palette_png_saved_as_rgb_is_explained(tmp_path, writers):
    fixture = writers.voc(tmp_path)
    label = fixture.root / "VOCdevkit/VOC2012/SegmentationClass/2007_000032.png"
    Image.open(label).convert("RGB").save(label)  # the mistake: colours instead of indices
    with pytest.raises(
        ValueError,
        match=r"2007_000032.png: label PNG has 3 channels \(mode RGB\); expected a "
        r"single-channel .*this dataset's palette colours",
    ):
        build_dataset("voc", fixture.root, "train")


def test_empty_split_and_lossy_or_mismatched_labels(tmp_path, writers):
    fixture = writers.voc(tmp_path)
    sets = fixture.root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (sets / "train.txt").write_text("\n")
    with pytest.raises(ValueError, match="split is empty"):
        build_dataset("voc", fixture.root, "train")
    ade = writers.ade20k(tmp_path / "ade")
    label = ade.root / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    Image.open(label).convert("L").save(label, format="JPEG")  # a JPEG with a .png name
    with pytest.raises(ValueError, match="ADE_val_00000001.png: this label file is a JPEG"):
        build_dataset("ade20k", ade.root, "val")
    label2 = ade.root / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    writers.save_png(label2, np.zeros((32, 96), np.uint8), "L")
    ds = build_dataset("ade20k", ade.root, "val", verify=0)
    with pytest.raises(ValueError, match=r"ADE_val_00000002.png: label is 32x96 .* but its image .* is 64x96"):
        ds[1]


def test_one_root_for_every_dataset(tmp_path, writers, monkeypatch):
    """$FASTSEG_DATASETS (or root=) may be the folder holding each dataset under its usual name."""
    writers.ade20k(tmp_path)
    writers.cityscapes(tmp_path)
    writers.voc(tmp_path)
    writers.coco_stuff(tmp_path)
    writers.coco_panoptic(tmp_path)
    monkeypatch.setenv("FASTSEG_DATASETS", str(tmp_path))
    for name in ("ade20k", "cityscapes", "voc", "coco_stuff", "coco_panoptic"):
        assert len(build_dataset(name, split="val", transform=None)) == 2, name
    monkeypatch.delenv("FASTSEG_DATASETS")
    with pytest.raises(ValueError, match="FASTSEG_DATASETS"):
        build_dataset("ade20k", split="val")


def test_eval_protocol_override(datasets_on_disk):
    root = datasets_on_disk["ade20k"].root
    ds = build_dataset("ade20k", root, "val", eval_protocol={"mode": "slide", "crop_size": 640, "stride": 608})
    assert ds.eval_protocol.mode == "slide" and ds.eval_protocol.scale == (2048, 512)  # ECENet's ADE20K test
    assert dataset_class("ade20k").eval_protocol.mode == "whole"  # the class default is untouched
    with pytest.raises(ValueError, match="larger than crop_size"):
        build_dataset("ade20k", root, "val", eval_protocol={"mode": "slide", "crop_size": 32, "stride": 64})


def test_bad_options_are_refused(datasets_on_disk):
    root = datasets_on_disk["ade20k"].root
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_dataset("ade20k", root, "test")
    with pytest.raises(ValueError, match="unknown class name 'unicorn'"):
        build_dataset("ade20k", root, "train", unseen=["unicorn"])
    with pytest.raises(ValueError, match="defines no unseen classes"):
        build_dataset("ade20k", root, "train", unseen="pading")
    with pytest.raises(ValueError, match="labelled_fraction must lie in"):
        build_dataset("ade20k", root, "train", labelled_fraction=1.5)
    with pytest.raises(ValueError, match="subset is empty"):
        build_dataset("ade20k", root, "train", labelled_fraction=0.0, subset="labelled")


def test_corrupt_files_and_limits(tmp_path, writers):
    """reliability.md's loader cases on a real layout: truncated image, PNG named .jpg, 16-bit label, pixel cap."""
    fixture = writers.ade20k(tmp_path)
    base = fixture.root / "ADEChallengeData2016"
    first = base / "images/training/ADE_train_00000001.jpg"
    png_bytes = tmp_path / "as.png"
    Image.open(first).save(png_bytes, format="PNG")
    first.write_bytes(png_bytes.read_bytes())  # a PNG under a .jpg name decodes by content
    ds = build_dataset("ade20k", fixture.root, "train", transform=None)
    assert torch.equal(ds[0]["mask"], torch.from_numpy(fixture["expected"]["train"]["ADE_train_00000001"]))
    second = base / "images/training/ADE_train_00000002.jpg"
    second.write_bytes(second.read_bytes()[:300])  # truncated
    with pytest.raises(OSError, match="cannot read image .*ADE_train_00000002.jpg"):
        ds[1]
    with pytest.raises(ValueError, match=r"ADE_train_00000001.jpg: image has 6144 pixels .* more than the limit"):
        build_dataset("ade20k", fixture.root, "train", max_pixels=1000)
    label = base / "annotations/training/ADE_train_00000003.png"
    wide = np.asarray(Image.open(label)).astype(np.uint16)
    wide[0, 0] = 300  # a 16-bit label: read whole (mmseg's uint8 cast would wrap it to 44), then refused
    Image.fromarray(wide).save(label)
    with pytest.raises(ValueError, match="ADE_train_00000003.png: label 300"):
        ds[2]
