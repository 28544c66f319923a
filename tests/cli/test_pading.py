"""`fastseg train mask2former_resnet18 --seen-only`, `fastseg train pading_resnet18 --stage1` and
`fastseg eval pading_resnet18` end to end on a tiny budget, and their bad inputs (refused before any step)."""

import json

import pytest

import fastseg
from fastseg.checkpoint import save_weights
from fastseg.cli import main

WORLD = ["--world", "zero-shot", "--image-size", "32"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_stage1")
    assert (
        main(
            [
                "train",
                "mask2former_resnet18",
                "--seen-only",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--val-length",
                "2",
                "--out",
                str(out),
                *WORLD,
            ]
        )
        == 0
    )
    return out / "model.safetensors"


def test_stage1_stage2_eval(stage1, tmp_path, capsys):
    out = tmp_path / "stage2"
    assert (
        main(
            [
                "train",
                "pading_resnet18",
                "--stage1",
                str(stage1),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--out",
                str(out),
                *WORLD,
            ]
        )
        == 0
    )
    assert (out / "model.safetensors").exists() and (out / "metrics.jsonl").exists()
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "pading_resnet18",
                "--checkpoint",
                str(out / "model.safetensors"),
                "--length",
                "2",
                "--json",
                str(report),
                *WORLD,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for row in ("mIoU (semantic)", "PQ (panoptic)", "AP50 (instance)"):
        assert row in printed
    metrics = json.loads(report.read_text())
    assert {"mIoU_seen", "mIoU_unseen", "mIoU_harmonic"} <= set(metrics["semantic"])


def test_bad_stage2_sources_fail_before_any_step(stage1, tmp_path, capsys):
    # No stage-1 checkpoint given.
    assert main(["train", "pading_resnet18", "--steps", "1", "--out", str(tmp_path / "a"), *WORLD]) == 2
    assert "--stage1" in capsys.readouterr().err
    # A stage-1 checkpoint of another split (default world: unseen ellipse, diamond only).
    assert (
        main(
            [
                "train",
                "pading_resnet18",
                "--stage1",
                str(stage1),
                "--steps",
                "1",
                "--image-size",
                "32",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "trained seen-only with unseen classes" in capsys.readouterr().err
    # A Mask2Former trained on every class (no seen-only protocol).
    plain = tmp_path / "plain.safetensors"
    save_weights(
        fastseg.create_model("mask2former_resnet18", num_classes=13),
        plain,
        {"architecture": "mask2former_resnet18", "num_classes": "13"},
    )
    assert (
        main(["train", "pading_resnet18", "--stage1", str(plain), "--steps", "1", "--out", str(tmp_path / "c"), *WORLD])
        == 2
    )
    assert "not a seen-only Mask2Former" in capsys.readouterr().err
    assert not (tmp_path / "c" / "metrics.jsonl").exists()  # refused before any step
    # --seen-only on a model that is not a Mask2Former.
    assert main(["train", "fpn_resnet18", "--seen-only", "--steps", "1", "--out", str(tmp_path / "d"), *WORLD]) == 2
    assert "a Mask2Former" in capsys.readouterr().err
