"""``fastseg train / eval / predict --data NAME --data-root DIR`` and ``fastseg datasets`` on every fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fastseg.cli import main

# Per dataset: the training split and small resize / crop so one step stays cheap on the CPU.
TRAIN = {
    "ade20k": "train", "cityscapes": "train", "voc": "train_aug", "coco_stuff": "train", "coco_panoptic": "train",
    "coco_instances": "train",
}  # fmt: skip


@pytest.mark.parametrize("name", list(TRAIN))
def test_train_then_eval_from_the_cli(datasets_on_disk, tmp_path, capsys, name):
    root = str(datasets_on_disk[name].root)
    out = tmp_path / "run"
    data = ["--data", name, "--data-root", root, "--data-arg", 'pipeline={"scale": [96, 64]}']
    assert (
        main(
            [
                "train",
                "fpn_resnet18",
                *data,
                "--train-split",
                TRAIN[name],
                "--crop",
                "32,32",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--warmup-steps",
                "0",
                "--val-split",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = tmp_path / "metrics.json"
    # Test at the stored size (the default protocols upscale these 64 x 96 fixtures to 512 or 800 pixels).
    assert (
        main(
            [
                "eval",
                "fpn_resnet18",
                "--checkpoint",
                str(out / "model.safetensors"),
                "--data",
                name,
                "--data-root",
                root,
                "--data-arg",
                'eval_protocol={"scale": null}',
                "--json",
                str(metrics),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "mIoU" in printed
    result = json.loads(metrics.read_text())
    assert 0.0 <= result["mIoU"] <= 1.0 and result["num_pixels"] > 0
    names = {
        "ade20k": "wall",
        "cityscapes": "road",
        "voc": "background",
        "coco_stuff": "person",
        "coco_panoptic": "person",
        "coco_instances": "person",
    }
    assert names[name] in printed  # the per-class table uses the dataset's class names


def test_eval_modes_and_predict_from_the_cli(datasets_on_disk, tmp_path, capsys):
    root = str(datasets_on_disk["cityscapes"].root)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "fpn_resnet18",
                "--data",
                "cityscapes",
                "--data-root",
                root,
                "--crop",
                "32,64",
                "--data-arg",
                'pipeline={"scale": [128, 64]}',
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--warmup-steps",
                "0",
                "--val-split",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    weights = str(out / "model.safetensors")
    for mode in ("whole", "slide", "ms_flip"):
        assert (
            main(
                [
                    "eval",
                    "fpn_resnet18",
                    "--checkpoint",
                    weights,
                    "--data",
                    "cityscapes",
                    "--data-root",
                    root,
                    "--mode",
                    mode,
                ]
            )
            == 0
        )
    image = next((datasets_on_disk["cityscapes"].root / "cityscapes/leftImg8bit/val").rglob("*.png"))
    assert (
        main(
            [
                "predict",
                "fpn_resnet18",
                str(image),
                "--checkpoint",
                weights,
                "--data",
                "cityscapes",
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    written = list((tmp_path / "pred").glob("*_pred.png"))
    assert len(written) == 1 and np.asarray(Image.open(written[0])).shape == (64, 128, 3)
    capsys.readouterr()


def test_datasets_command_lists_and_checks(datasets_on_disk, tmp_path, writers, capsys):
    assert main(["datasets"]) == 0
    listing = capsys.readouterr().out
    for name in TRAIN:
        assert name in listing
    assert "ADEChallengeData2016" in listing and "slide" in listing
    root = str(datasets_on_disk["voc"].root)
    assert main(["datasets", "voc", "--data-root", root, "--full"]) == 0
    assert "voc train_aug: 5 images, 21 classes; 5 label files decoded and checked" in capsys.readouterr().out
    broken = writers.ade20k(tmp_path)
    (broken.root / "ADEChallengeData2016/annotations/training/ADE_train_00000002.png").unlink()
    assert main(["datasets", "ade20k", "--data-root", str(broken.root)]) == 1
    captured = capsys.readouterr()
    assert "ade20k val: 2 images" in captured.out
    assert "ADE_train_00000002.jpg has no label" in captured.err


def test_cli_data_errors(datasets_on_disk, tmp_path, capsys):
    with pytest.raises(SystemExit, match="needs --data-root"):
        main(["eval", "fpn_resnet18", "--checkpoint", "x.safetensors", "--data", "ade20k"])
    assert (
        main(
            [
                "eval",
                "fpn_resnet18",
                "--checkpoint",
                "x.safetensors",
                "--data",
                "ade20k",
                "--data-root",
                str(tmp_path / "missing"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="classes from the annotation JSON"):
        main(["predict", "fpn_resnet18", "x.png", "--checkpoint", "x.safetensors", "--data", "coco_panoptic"])


def test_semi_supervised_training_on_voc_from_the_cli(datasets_on_disk, tmp_path, capsys):
    root = str(datasets_on_disk["voc"].root)
    assert (
        main(
            [
                "train",
                "unimatch_resnet18",
                "--data",
                "voc",
                "--data-root",
                root,
                "--train-split",
                "train_aug",
                "--labelled-fraction",
                "0.4",
                "--crop",
                "32,32",
                "--data-arg",
                'pipeline={"scale": [96, 64]}',
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--warmup-steps",
                "0",
                "--val-split",
                "none",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in log if r.get("step") == 1 and "loss" in r)
    assert {"sup", "s1", "s2", "fp", "conf_ratio"} <= set(step)  # UniMatch's terms: labelled + unlabelled pairs
    capsys.readouterr()
