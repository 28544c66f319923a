"""`fastseg` end to end for the universal model on tiny budgets: train --task panoptic, eval --task panoptic /
instance / semantic, predict --task panoptic, shapes --format coco-panoptic / coco-instances, bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from fastseg.cli import main

TINY = [
    "--model-arg",
    "num_queries=8",
    "--model-arg",
    "hidden_dim=32",
    "--model-arg",
    "mask_dim=32",
    "--model-arg",
    "dec_layers=2",
    "--model-arg",
    "enc_layers=1",
    "--model-arg",
    "train_num_points=128",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("m2f")
    code = main(
        [
            "train",
            "mask2former_resnet18",
            "--task",
            "panoptic",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--val-length",
            "2",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    return out


def test_eval_all_tasks_prints_and_writes_json(trained, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "mask2former_resnet18",
                "--checkpoint",
                str(trained / "model.safetensors"),
                "--task",
                "semantic,panoptic,instance",
                "--length",
                "4",
                "--json",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "PQ" in printed and "mask AP" in printed
    report = json.loads(out.read_text())
    assert set(report) == {"semantic", "panoptic", "instance"}
    assert {"PQ", "SQ", "RQ", "things", "stuff", "seen", "unseen", "per_class"} <= set(report["panoptic"])
    assert {"AP", "AP50", "AP75"} <= set(report["instance"])


def test_predict_panoptic_overlay(trained, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    assert (
        main(
            [
                "predict",
                "mask2former_resnet18",
                str(image),
                "--checkpoint",
                str(trained / "model.safetensors"),
                "--task",
                "panoptic",
                "--out",
                str(tmp_path / "pred"),
                *TINY,
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "pred" / "img_pred.png") as pred:
        assert pred.size == (56, 40)


def test_shapes_coco_formats(tmp_path, capsys):
    assert (
        main(
            [
                "shapes",
                "--format",
                "coco-panoptic",
                "--out",
                str(tmp_path),
                "--n",
                "3",
                "--split",
                "val",
                "--world",
                "zero-shot",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "panoptic_val.json").read_text())
    assert len(data["annotations"]) == 3 and any(c["name"] == "snow" for c in data["categories"])
    assert (tmp_path / "panoptic_val" / "000002.png").is_file()
    assert main(["shapes", "--format", "coco-instances", "--out", str(tmp_path), "--n", "3", "--split", "val"]) == 0
    assert len(json.loads((tmp_path / "instances_val.json").read_text())["images"]) == 3
    # an existing file is not overwritten without --overwrite
    assert main(["shapes", "--format", "coco-instances", "--out", str(tmp_path), "--n", "3", "--split", "val"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_panoptic_task_on_a_semantic_model_is_a_clear_error(capsys):
    assert main(["train", "fpn_resnet18", "--task", "panoptic", "--steps", "1"]) == 2
    assert "panoptic and instance tasks need a universal model" in capsys.readouterr().err


def test_zero_shot_world_gives_the_model_its_classes_and_split():
    import fastseg
    from fastseg.cli.train import _apply_world
    from fastseg.data.shapes import zero_shot_config

    world = zero_shot_config()
    model = fastseg.create_model("mask2former_resnet18", num_classes=world.num_classes, num_queries=4)
    _apply_world(model, world)
    cfg = model.pretrained_cfg
    assert cfg.class_names == world.class_names and cfg.stuff_classes == world.stuff_ids
    assert cfg.thing_classes == world.thing_ids and cfg.num_classes == 13
