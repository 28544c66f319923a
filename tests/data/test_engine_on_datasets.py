"""Models and the engine consume the on-disk readers unchanged: training steps, evaluation under the dataset's
protocol, the semi-supervised pairs, and a model whose PretrainedCfg comes from the dataset."""

from __future__ import annotations

import math

import torch

import fastseg
from fastseg.data import build_dataset
from fastseg.data.semi import SemiSupervisedPairs
from fastseg.engine import TrainConfig, train
from fastseg.engine.recipes.semi import s4mim_loss
from fastseg.registry import PretrainedCfg


def test_fpn_trains_and_evaluates_on_cityscapes_fixture(datasets_on_disk, tmp_path):
    root = datasets_on_disk["cityscapes"].root
    train_set = build_dataset("cityscapes", root, "train", pipeline={"scale": (128, 64), "crop_size": (32, 64)})
    val_set = build_dataset("cityscapes", root, "val")  # slide 768 x 768: one shrunken window per image
    fields = train_set.pretrained_cfg_fields()
    model = fastseg.create_model("fpn_resnet18", num_classes=fields["num_classes"])
    # The dataset's names, palette and normalisation replace the shapes defaults; the architecture fields stay.
    model.pretrained_cfg = PretrainedCfg.from_dict({**model.pretrained_cfg.to_dict(), **fields})
    assert model.pretrained_cfg.class_names[0] == "road" and model.pretrained_cfg.dataset == "cityscapes"
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, out_dir=str(tmp_path / "run"), progress=False, log_every=1)
    result = train(model, train_set, cfg, val_set=val_set)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert 0.0 <= result.final_metrics["mIoU"] <= 1.0
    assert result.final_metrics["num_pixels"] == sum(int((val_set[j]["mask"] != 255).sum()) for j in range(2))


def test_semi_supervised_pairs_from_a_labelled_fraction(datasets_on_disk):
    root = datasets_on_disk["voc"].root
    options = {"labelled_fraction": 0.4, "pipeline": {"scale": (96, 64), "crop_size": (32, 32)}}
    labelled = build_dataset("voc", root, "train_aug", subset="labelled", **options)
    unlabelled = build_dataset("voc", root, "train_aug", subset="unlabelled", **options)
    pairs = SemiSupervisedPairs(labelled, unlabelled, length=4)
    model = fastseg.create_model("unimatch_resnet18", num_classes=21)
    batch = torch.utils.data.default_collate([pairs[0], pairs[1]])
    assert batch["image"].shape == batch["image_u"].shape == (2, 3, 32, 32)
    terms = s4mim_loss(model, batch)
    assert math.isfinite(float(terms["loss"].detach()))
