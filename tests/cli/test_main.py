"""The `fastseg` command end to end on tiny budgets: list, shapes, train, resume, eval, predict, bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from fastseg.cli import main


def test_list(capsys):
    assert main(["list", "fpn*"]) == 0
    assert "fpn_resnet18" in capsys.readouterr().out.split()
    assert main(["list", "no_such*"]) == 1


def test_list_shows_the_tag_and_what_differs_from_the_paper(capsys):
    assert main(["list", "ecenet_resnet*"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert ".shapes_small: head width 128 (paper: 256)" in lines["ecenet_resnet18"]
    assert lines["ecenet_resnet50"] == "ecenet_resnet50"  # follows the paper: nothing to say


def test_shapes_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["shapes", "--out", str(out), "--n", "4", "--columns", "2", "--image-size", "48,64"]) == 0
    with Image.open(out) as img:
        assert img.width > 2 * 64 and img.height > 2 * 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(
        [
            "train",
            "fpn_mit_b0",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--val-length",
            "4",
            "--save-every",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_train_writes_weights_log_and_resumes(trained, capsys):
    assert (trained / "model.safetensors").is_file() and (trained / "last_state.pt").is_file()
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 4
    # Asking for more steps on the same run directory resumes from step 4 rather than starting over.
    assert (
        main(
            [
                "train",
                "fpn_mit_b0",
                "--steps",
                "6",
                "--batch-size",
                "2",
                "--val-length",
                "4",
                "--out",
                str(trained),
                "--resume",
                "auto",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[-1]["step"] == 4 and starts[-1]["resumed_from"]
    assert [r["step"] for r in records if "loss" in r][-1] == 6


def test_eval_prints_metrics_and_json(trained, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "fpn_mit_b0",
                "--checkpoint",
                str(trained / "model.safetensors"),
                "--length",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert "mIoU" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert len(metrics["IoU"]) == 12
    # The same number, recomputed without the CLI or the metrics module: predict the 4 validation images (one batch,
    # as the CLI's batch of 32 holds them all) and take per-class IoU with boolean masks.
    import torch

    import fastseg
    from fastseg.data.shapes import ShapesConfig, ShapesDataset

    world = ShapesConfig(image_size=(64, 64))
    model = fastseg.create_model(
        "fpn_mit_b0", num_classes=world.num_classes, checkpoint_path=str(trained / "model.safetensors")
    ).eval()
    data = ShapesDataset("val", length=4, config=world, seed=0)
    with torch.no_grad():
        pred = model.predict(torch.stack([data[i]["image"] for i in range(4)])).numpy()
    target = torch.stack([data[i]["mask"] for i in range(4)]).numpy()
    keep = target != 255
    ious = []
    for c in range(world.num_classes):
        p, t = (pred == c) & keep, (target == c) & keep
        if (p | t).any():
            ious.append((p & t).sum() / (p | t).sum())
    assert metrics["mIoU"] == pytest.approx(float(np.mean(ious)), abs=1e-9)


def test_predict_writes_overlays(trained, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    out_dir = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "fpn_mit_b0",
                str(image),
                "--checkpoint",
                str(trained / "model.safetensors"),
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    with Image.open(out_dir / "img_pred.png") as pred:
        assert pred.size == (56, 40)


def test_bad_input_is_a_clear_error(trained, tmp_path, capsys):
    assert main(["eval", "fpn_resnet81", "--checkpoint", str(trained / "model.safetensors")]) == 2
    assert "unknown model 'fpn_resnet81'" in capsys.readouterr().err
    assert main(["eval", "fpn_mit_b0", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a png")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["predict", "fpn_mit_b0", str(not_an_image), "--checkpoint", str(trained / "model.safetensors")])
    with pytest.raises(SystemExit):
        main(["train", "fpn_mit_b0", "--image-size", "0,5"])
