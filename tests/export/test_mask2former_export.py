"""Mask2Former export of the raw (class logits, mask logits) outputs through `export_onnx_file` + ONNX Runtime
parity at 64 x 64. The semantic output goes through `fastseg export` + `fastseg verify` with every other model in
test_onnx_export.py (mask2former_resnet18 is in its default tier)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from fastseg.export.api import build_model
from fastseg.export.onnx import export_onnx_file
from fastseg.models.mask2former import Mask2FormerRaw

pytestmark = pytest.mark.export


def test_raw_outputs_export_matches_pytorch(tmp_path):
    model = build_model("mask2former_resnet18")
    raw = Mask2FormerRaw(model).eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "m2f_raw.onnx"
    export_onnx_file(raw, x, path, output_names=("class_logits", "mask_logits"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["class_logits", "mask_logits"]
    cls, masks = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref_cls, ref_masks = raw(x)
    for ref, out in ((ref_cls, cls), (ref_masks, masks)):
        out = torch.from_numpy(out)
        assert out.shape == ref.shape
        err = (out - ref).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err
