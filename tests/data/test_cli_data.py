"""``fastseg train / eval / predict --data NAME --data-root DIR`` and ``fastseg datasets`` on every fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fastseg.cli import main

# Per dataset: its training split and the first class name, which the evaluation table must print.
DATASETS = {
    "ade20k": ("train", "wall"),
    "cityscapes": ("train", "road"),
    "voc": ("train_aug", "background"),
    "coco_stuff": ("train", "person"),
    "coco_panoptic": ("train", "person"),
    "coco_instances": ("train", "person"),
}
# One cheap step: a small resize and crop, batch 2, no evaluation during training.
ONE_STEP = "--steps 1 --batch-size 2 --warmup-steps 0 --val-split none".split()


def _train(model: str, name: str, root: str, out, *extra: str) -> int:
    data = ["--data", name, "--data-root", root, "--data-arg", 'pipeline={"scale": [128, 64]}']
    return main(["train", model, *data, *extra, *ONE_STEP, "--out", str(out)])


@pytest.mark.parametrize("name", list(DATASETS))
def test_train_then_eval_from_the_cli(datasets_on_disk, tmp_path, capsys, name):
    root = str(datasets_on_disk[name].root)
    split, first_class = DATASETS[name]
    assert _train("fpn_resnet18", name, root, tmp_path / "run", "--train-split", split, "--crop", "32,32") == 0
    metrics = tmp_path / "metrics.json"
    weights = str(tmp_path / "run" / "model.safetensors")
    # Test at the stored size (the default protocols upscale these 64 x 96 fixtures to 512 or 800 pixels).
    stored = ["--data-arg", 'eval_protocol={"scale": null}']
    assert main(["eval", "fpn_resnet18", "--checkpoint", weights, "--data", name, "--data-root", root, *stored,
                 "--json", str(metrics)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads(metrics.read_text())
    assert "mIoU" in printed and 0.0 <= result["mIoU"] <= 1.0 and result["num_pixels"] > 0
    assert first_class in printed  # the per-class table uses the dataset's class names


def test_eval_modes_and_predict_from_the_cli(datasets_on_disk, tmp_path, capsys):
    root = str(datasets_on_disk["cityscapes"].root)
    assert _train("fpn_resnet18", "cityscapes", root, tmp_path / "run", "--crop", "32,64") == 0
    weights = str(tmp_path / "run" / "model.safetensors")
    data = ["--data", "cityscapes", "--data-root", root]
    for mode in ("whole", "slide", "ms_flip"):
        assert main(["eval", "fpn_resnet18", "--checkpoint", weights, *data, "--mode", mode]) == 0
    image = next((datasets_on_disk["cityscapes"].root / "cityscapes/leftImg8bit/val").rglob("*.png"))
    out = tmp_path / "pred"
    predict = ["predict", "fpn_resnet18", str(image), "--checkpoint", weights, "--data", "cityscapes"]
    assert main([*predict, "--out", str(out)]) == 0
    written = list(out.glob("*_pred.png"))
    assert len(written) == 1 and np.asarray(Image.open(written[0])).shape == (64, 128, 3)
    capsys.readouterr()


def test_semi_supervised_training_on_voc_from_the_cli(datasets_on_disk, tmp_path, capsys):
    root = str(datasets_on_disk["voc"].root)
    semi = ["--train-split", "train_aug", "--labelled-fraction", "0.4", "--crop", "32,32"]
    assert _train("unimatch_resnet18", "voc", root, tmp_path / "run", *semi) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in log if r.get("step") == 1 and "loss" in r)
    assert {"sup", "s1", "s2", "fp", "conf_ratio"} <= set(step)  # UniMatch's terms: labelled + unlabelled pairs
    capsys.readouterr()


def test_datasets_command_lists_and_checks(datasets_on_disk, tmp_path, writers, capsys):
    assert main(["datasets"]) == 0
    listing = capsys.readouterr().out
    for name in DATASETS:
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


def test_cli_data_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTSEG_DATASETS", raising=False)
    evaluate = ["eval", "fpn_resnet18", "--checkpoint", "x.safetensors", "--data", "ade20k"]
    with pytest.raises(SystemExit, match="needs --data-root"):
        main(evaluate)
    assert main([*evaluate, "--data-root", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="classes from the annotation JSON"):
        main(["predict", "fpn_resnet18", "x.png", "--checkpoint", "x.safetensors", "--data", "coco_panoptic"])


def test_mask2former_panoptic_on_coco_panoptic_from_the_cli(datasets_on_disk, tmp_path, capsys):
    """A universal model trains on the panoptic reader's instances and is scored with PQ from the CLI."""
    root = str(datasets_on_disk["coco_panoptic"].root)
    assert _train("mask2former_resnet18", "coco_panoptic", root, tmp_path / "run", "--task", "panoptic",
                  "--crop", "64,64") == 0  # fmt: skip
    weights = str(tmp_path / "run" / "model.safetensors")
    report = tmp_path / "report.json"
    stored = ["--data-arg", 'eval_protocol={"scale": null}']
    assert main(["eval", "mask2former_resnet18", "--checkpoint", weights, "--data", "coco_panoptic",
                 "--data-root", root, *stored, "--task", "semantic,panoptic", "--json", str(report)]) == 0  # fmt: skip
    result = json.loads(report.read_text())
    assert 0.0 <= result["semantic"]["mIoU"] <= 1.0 and 0.0 <= result["panoptic"]["PQ"] <= 1.0
    assert "PQ" in capsys.readouterr().out
