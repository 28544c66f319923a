"""`fastseg export` and `fastseg verify` end to end on fpn_resnet18: a weights file (the deployment path from a
trained checkpoint), uint8 in-graph argmax, non-square size."""

from __future__ import annotations

import os

import pytest

from fastseg.cli import main
from fastseg.export import read_sidecar

SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)

pytestmark = pytest.mark.export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A weights file as training writes it (metadata holds num_classes), with weights unlike the seeded init."""
    import torch

    import fastseg
    from fastseg.checkpoint import save_weights

    torch.manual_seed(SEED + 123)
    model = fastseg.create_model("fpn_resnet18", num_classes=12)
    return save_weights(model, tmp_path_factory.mktemp("ckpt") / "model.safetensors", {"num_classes": "12"})


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("cli") / "seg.onnx"
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        code = main(
            [
                "export",
                "fpn_resnet18",
                "--checkpoint",
                str(checkpoint),
                "--format",
                "onnx",
                "--imgsz",
                "64,96",
                "--argmax",
                "--labels-dtype",
                "uint8",
                "--out",
                str(out),
            ]
        )
    finally:
        capture.undo()
    return out, code, buffer.getvalue()


def test_cli_export_prints_paths_and_trtexec(cli_export):
    out, code, printed = cli_export
    assert code == 0, printed
    assert f"artefact: {out}" in printed and f"sidecar:  {out}.json" in printed
    assert f"trtexec --onnx={out} --saveEngine={out.with_suffix('.engine')}" in printed
    data = read_sidecar(out)
    assert data["outputs"][0]["dtype"] == "uint8" and data["outputs"][0]["shape"] == [1, 64, 96]
    assert data["weights"]["checkpoint"].endswith("model.safetensors") and len(data["weights"]["sha256"]) == 64
    assert data["weights"]["init_seed"] is None


def test_cli_verify_passes(cli_export, capsys, tmp_path):
    out, _, _ = cli_export
    report = tmp_path / "report.json"
    assert main(["verify", str(out), "--images", "4", "--random", "1", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "argmax agreement  100.000 %" in printed and "PASS" in printed
    assert '"passed": true' in report.read_text()


def test_cli_verify_fails_past_thresholds(cli_export, capsys):
    """An impossible threshold (agreement > 100 %) must give exit status 1."""
    out, _, _ = cli_export
    assert main(["verify", str(out), "--images", "2", "--random", "0", "--min-agreement", "1.01"]) == 1
    assert "FAIL: argmax agreement" in capsys.readouterr().out


def test_cli_export_refuses_overwrite(cli_export, capsys):
    out, _, _ = cli_export
    before = out.read_bytes()
    assert main(["export", "fpn_resnet18", "--imgsz", "64,96", "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err and out.read_bytes() == before


def test_cli_bad_size_and_format(capsys):
    assert main(["export", "fpn_resnet18", "--imgsz", "100,64", "--out", "/nonexistent/x.onnx"]) == 2
    assert "nearest valid height: 96 or 128" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "fpn_resnet18", "--format", "tflite"])


def test_cli_verify_against_other_weights_fails(cli_export, capsys, tmp_path):
    """verify really compares with the checkpoint: the seeded init weights give different masks -> exit 1."""
    out, _, _ = cli_export
    import shutil

    from fastseg.export.sidecar import sidecar_path, write_sidecar

    copy = tmp_path / "copy.onnx"
    shutil.copy(out, copy)
    data = read_sidecar(out)
    data["weights"] = {"checkpoint": None, "sha256": None, "init_seed": 0}
    write_sidecar(copy, data)
    assert sidecar_path(copy).is_file()
    assert main(["verify", str(copy), "--images", "2", "--random", "0"]) == 1
    assert "FAIL: argmax agreement" in capsys.readouterr().out


def test_changed_checkpoint_is_detected(cli_export, checkpoint, tmp_path, capsys):
    out, _, _ = cli_export
    import shutil

    from fastseg.export import verify

    moved = tmp_path / "model.safetensors"
    shutil.copy(checkpoint, moved)
    data = moved.read_bytes()
    moved.write_bytes(data[:-4] + bytes(4))  # same size, different weights
    assert main(["verify", str(out), "--checkpoint", str(checkpoint), "--images", "1", "--random", "0"]) == 0
    import json

    sidecar = json.loads((out.parent / (out.name + ".json")).read_text())
    sidecar["weights"]["checkpoint"] = str(moved)
    (tmp_path / "x.onnx").write_bytes(out.read_bytes())
    (tmp_path / "x.onnx.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="changed since the export"):
        verify(tmp_path / "x.onnx")
