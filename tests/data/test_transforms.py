"""The training pipeline: keep-ratio resize, crop with the category-ratio check, flip, photometric distortion, pad."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastseg.data import TrainPipeline, build_dataset
from fastseg.data.transforms import (
    photometric_distortion,
    random_crop_box,
    rescale_size,
)


def test_rescale_size_follows_mmseg_keep_ratio():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # an ADE20K image at ratio 1: unchanged
    assert rescale_size(1024, 2048, (2048, 1024), 0.5) == (512, 1024)  # Cityscapes at ratio 0.5
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # VOC: the short side reaches 512 first
    assert rescale_size(100, 4000, (2048, 512)) == (51, 2048)  # a panorama: the long side binds
    with pytest.raises(ValueError):
        rescale_size(0, 10, (2048, 512))


def test_crop_rejects_crops_dominated_by_one_class():
    mask = np.zeros((100, 100), np.int64)
    mask[:, 80:] = 1  # only crops reaching x >= 80 hold a second class
    rng = np.random.default_rng(0)
    checked = [random_crop_box(mask, (50, 50), rng, cat_max_ratio=0.75) for _ in range(50)]
    free = [random_crop_box(mask, (50, 50), np.random.default_rng(s), cat_max_ratio=1.0) for s in range(50)]

    def dominated(box):
        y0, y1, x0, x1 = box
        counts = np.bincount(mask[y0:y1, x0:x1].ravel(), minlength=2)
        return counts.max() / counts.sum() >= 0.75

    # Without the check most crops are pure background; with it, a dominated crop survives only after 10 draws.
    assert sum(map(dominated, free)) > 35 and sum(map(dominated, checked)) < sum(map(dominated, free)) / 2
    ignored = np.full((100, 100), 255)
    assert (
        random_crop_box(ignored, (50, 50), rng, cat_max_ratio=0.75)[1] - random_crop_box(ignored, (50, 50), rng)[0] > 0
    )  # all-ignore labels do not loop forever


def test_pipeline_keeps_image_and_labels_aligned(datasets_on_disk, writers):
    """Resize, crop and flip move pixels and labels together: the oracle reads the cropped image's classes back."""
    fixture = datasets_on_disk["cityscapes"]
    pipeline = TrainPipeline(scale=(256, 128), ratio_range=(0.5, 2.0), crop_size=(48, 64), photometric=False)
    ds = build_dataset("cityscapes", fixture.root, "train", transform=pipeline)
    oracle = writers.CodeOracle(fixture["classes"], 19)
    for seed in range(12):
        torch.manual_seed(seed)
        sample = ds[seed % len(ds)]
        assert sample["image"].shape == (3, 48, 64) and sample["mask"].shape == (48, 64)
        pred = oracle.predict(sample["image"][None])[0]
        mask = sample["mask"]
        # Nearest-neighbour labels and bilinear images may disagree on the pixel next to a class edge; everywhere
        # else (the label equals its 8 neighbours) they must agree exactly, which a 1-pixel shift or a flip of one
        # but not the other would break.
        padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
        interior = (mask != 255).clone()
        for dy in range(3):
            for dx in range(3):
                interior &= padded[dy : dy + 48, dx : dx + 64] == mask
        assert interior.sum() > 300, seed
        assert torch.equal(pred[interior], mask[interior]), seed


def test_padding_when_the_image_is_smaller_than_the_crop():
    pipeline = TrainPipeline(scale=None, crop_size=(40, 40), photometric=False, flip_prob=0.0)
    image = np.full((20, 30, 3), 200, np.uint8)
    mask = np.ones((20, 30), np.int64)
    instances = np.ones((20, 30), np.int64)
    out = pipeline({"image": image, "mask": mask, "instances": instances}, np.random.default_rng(0))
    assert out["image"].shape == (40, 40, 3) and out["mask"].shape == (40, 40)
    assert (out["mask"][20:] == 255).all() and (out["mask"][:, 30:] == 255).all() and (out["mask"][:20, :30] == 1).all()
    assert (out["instances"][20:] == 0).all() and not out["valid"][25, 35] and out["valid"][5, 5]
    assert (out["image"][20:] == 0).all()


def test_flip_mirrors_image_and_mask_together():
    pipeline = TrainPipeline(scale=None, crop_size=(4, 6), cat_max_ratio=1.0, photometric=False, flip_prob=1.0)
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :2] = 255
    mask = np.zeros((4, 6), np.int64)
    mask[:, :2] = 1
    out = pipeline({"image": image, "mask": mask}, np.random.default_rng(0))
    assert (out["mask"][:, 4:] == 1).all() and (out["image"][:, 4:] == 255).all() and (out["image"][:, :4] == 0).all()


def test_photometric_distortion_is_seeded_and_bounded():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a = photometric_distortion(image, np.random.default_rng(7))
    b = photometric_distortion(image, np.random.default_rng(7))
    assert a.dtype == np.float32 and a.shape == image.shape and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 255
    changed = [not np.allclose(photometric_distortion(image, np.random.default_rng(s)), image) for s in range(10)]
    assert sum(changed) >= 8  # each of four terms fires with probability 0.5


def test_pipeline_validation():
    with pytest.raises(ValueError, match="ratio_range"):
        TrainPipeline(ratio_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="cat_max_ratio"):
        TrainPipeline(cat_max_ratio=0.0)
    with pytest.raises(ValueError, match="crop_size"):
        TrainPipeline(crop_size=(0, 10))
