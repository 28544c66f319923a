"""Bad export / verify input -> a clear error before any slow work, and nothing on disk overwritten."""

from __future__ import annotations

import json

import pytest

from fastseg.cli.export import add_export_commands  # noqa: F401  (import check: the CLI hook must exist)
from fastseg.export import export, read_sidecar, resolve_shapes, verify
from fastseg.export.sidecar import write_sidecar


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'.*onnx, engine, aoti"):
        export("fpn_resnet18", format="tflite", imgsz=64, out=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'fpn_resnet19'.*fpn_resnet18"):
        export("fpn_resnet19", imgsz=64, out=tmp_path / "m.onnx")


def test_size_not_a_multiple_of_the_stride_names_nearest_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"height 100 is not a multiple of 32.*nearest valid height: 96 or 128"):
        export("fpn_resnet18", imgsz=(100, 64), out=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"width 70 is not a multiple of 32.*64 or 96"):
        resolve_shapes((64, 70), 1, False, 32)
    with pytest.raises(ValueError, match="max height 100"):
        resolve_shapes((64, 64), 1, True, 32, max_shape=(1, 100, 128))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        resolve_shapes((64, 64), 1, True, 32, min_shape=(96, 96))
    with pytest.raises(ValueError, match="only apply to dynamic exports"):
        resolve_shapes((64, 64), 1, False, 32, max_shape=(128, 128))
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {missing} does not exist"):
        export("fpn_resnet18", imgsz=64, checkpoint=missing, out=tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", ["m.onnx", "m.onnx.json"])
def test_existing_output_is_not_overwritten(tmp_path, existing):
    target = tmp_path / existing
    target.write_text("precious")
    with pytest.raises(FileExistsError, match=f"{target}.*force"):
        export("fpn_resnet18", imgsz=64, out=tmp_path / "m.onnx")
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_existing_engine_onnx_is_not_overwritten(tmp_path):
    """An engine export also writes <name>.onnx: that file is protected too (checked before TensorRT is needed)."""
    (tmp_path / "m.onnx").write_text("precious")
    with pytest.raises(FileExistsError, match="m.onnx"):
        export("fpn_resnet18", format="engine", imgsz=64, out=tmp_path / "m.engine")
    assert (tmp_path / "m.onnx").read_text() == "precious"


def test_other_bad_options(tmp_path):
    with pytest.raises(ValueError, match="labels_dtype"):
        export("fpn_resnet18", imgsz=64, argmax=True, labels_dtype="int8", out=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset 13 is too old"):
        export("fpn_resnet18", imgsz=64, opset=13, out=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset 21 is above 20.*--no-tensorrt-check"):
        export("fpn_resnet18", imgsz=64, opset=21, out=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="int8 applies to TensorRT engines only"):
        export("fpn_resnet18", imgsz=64, int8=True, out=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        resolve_shapes(64, 0, False, 32)
    assert list(tmp_path.iterdir()) == []


def test_engine_without_tensorrt_says_how_to_build_it(tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: the guard cannot fire")
    with pytest.raises(ImportError, match=r"pip install tensorrt.*trtexec"):
        export("fpn_resnet18", format="engine", imgsz=64, out=tmp_path / "m.engine")
    assert list(tmp_path.iterdir()) == []


def test_verify_bad_artefacts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verify(tmp_path / "missing.onnx")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no sidecar"):
        verify(lonely)
    (tmp_path / "lonely.onnx.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_sidecar(lonely)
    (tmp_path / "lonely.onnx.json").write_text(json.dumps({"schema": "fastseg.export/1", "model": "x"}))
    with pytest.raises(ValueError, match="lacks required fields"):
        read_sidecar(lonely)


def test_sidecar_write_read_round_trip(tmp_path):
    artefact = tmp_path / "a.onnx"
    data = {
        "model": "m",
        "format": "onnx",
        "pretrained_cfg": {"num_classes": 3, "palette": [(1, 2, 3)]},
        "inputs": [{"name": "images"}],
        "outputs": [{"name": "logits"}],
        "versions": {"torch": "x"},
    }
    path = write_sidecar(artefact, data)
    assert path == tmp_path / "a.onnx.json"
    back = read_sidecar(artefact)
    assert back["schema"] == "fastseg.export/1"
    assert back["pretrained_cfg"]["palette"] == [[1, 2, 3]]
    assert read_sidecar(path) == back


def test_trtexec_built_engine_uses_the_onnx_sidecar(tmp_path):
    """An engine built by the printed trtexec line has no sidecar: verify reads its ONNX's and needs TensorRT."""
    from fastseg.export.verify import fmt_is_engine_without_sidecar

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    assert not fmt_is_engine_without_sidecar(engine)
    (tmp_path / "m.onnx.json").write_text("{}")
    assert fmt_is_engine_without_sidecar(engine)


def test_math_attention_matches_sdpa():
    """The export-time attention (plain MatMul / Softmax) equals F.scaled_dot_product_attention."""
    import torch
    import torch.nn.functional as F

    from fastseg.export.onnx import _math_sdpa, math_attention

    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    bias = torch.randn(1, 3, 7, 7)
    boolean = torch.rand(2, 1, 7, 7) > 0.3
    boolean[..., 0] = True  # no fully masked row
    for kwargs in ({}, {"attn_mask": bias}, {"attn_mask": boolean}, {"is_causal": True}, {"scale": 0.1}):
        torch.testing.assert_close(_math_sdpa(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))
    original = F.scaled_dot_product_attention
    with math_attention():
        assert F.scaled_dot_product_attention is _math_sdpa
    assert F.scaled_dot_product_attention is original
