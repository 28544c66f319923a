"""ONNX export of every registered model: static (square), static non-square with in-graph argmax, and dynamic
batch + spatial axes; each checked with onnx.checker (full), the TensorRT operator list and ONNX Runtime parity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fastseg.export import (
    check_tensorrt_ops,
    export,
    read_sidecar,
    sidecar_path,
    verify,
)
from fastseg.export.api import DeployModule, build_model

from .conftest import NONSQUARE_SIZE, STATIC_SIZE, model_params

pytestmark = pytest.mark.export


def _run(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _assert_logits_parity(ref: torch.Tensor, out: torch.Tensor) -> None:
    """fp32 rule (specs/reliability.md 3): max abs error <= 1e-4 x logits scale, argmax agreement >= 99.9 %."""
    assert out.shape == ref.shape and out.dtype == torch.float32
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"max abs error {err:.3e} > 1e-4 x scale {scale:.3g}"
    agreement = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agreement >= 0.999, f"argmax agreement {agreement:.4%}"


# ----------------------------------------------------------------------------------------------------- static
@pytest.fixture(scope="module", params=model_params("static"))
def static_export(request, export_dir):
    name = request.param
    path = export(name, format="onnx", imgsz=STATIC_SIZE, out=export_dir / f"{name}_static.onnx")
    return name, path


def test_static_checker_and_tensorrt_ops(static_export):
    name, path = static_export
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    counts = check_tensorrt_ops(proto)
    assert counts.get("Conv", 0) > 0
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"{name}: non-standard domains {domains}"
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["logits"]


def test_static_onnxruntime_parity(static_export):
    name, path = static_export
    model = build_model(name)  # same seeded weights as the export (no checkpoint)
    x = torch.randn(1, 3, *STATIC_SIZE)
    with torch.no_grad():
        ref = model(x)
    _assert_logits_parity(ref, _run(path, x))


def test_static_verify_passes(static_export):
    _, path = static_export
    report = verify(path, num_images=4, num_random=1)
    assert report.passed, report.format()
    assert report.max_abs_err is not None and report.max_abs_err <= 1e-4 * report.logits_scale
    assert report.argmax_agreement >= 0.999 and report.cosine > 0.9999
    assert report.miou_torch is not None and abs(report.miou_delta_points) < 0.5


def test_sidecar_round_trip(static_export):
    name, path = static_export
    data = read_sidecar(path)
    model = build_model(name)
    cfg = model.pretrained_cfg.to_dict()
    assert data["model"] == name and data["format"] == "onnx" and data["precision"] == "fp32"
    assert data["pretrained_cfg"] == json.loads(json.dumps(cfg))  # JSON turns tuples into lists
    assert type(model.pretrained_cfg).from_dict(data["pretrained_cfg"]) == model.pretrained_cfg
    (inp,), (out,) = data["inputs"], data["outputs"]
    assert inp["shape"] == [1, 3, *STATIC_SIZE] and inp["profile"]["min"] == inp["profile"]["max"]
    s = cfg["output_stride"]
    assert out == {
        **out,
        "name": "logits",
        "dtype": "float32",
        "shape": [1, cfg["num_classes"], STATIC_SIZE[0] // s, STATIC_SIZE[1] // s],
    }
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["onnxruntime"] == ort.__version__
    assert data["weights"] == {"checkpoint": None, "sha256": None, "init_seed": 0}
    assert data["trtexec"].startswith("trtexec --onnx=") and "--saveEngine=" in data["trtexec"]
    assert sidecar_path(path).name == path.name + ".json"


# ----------------------------------------------------------------------------------- non-square, argmax output
@pytest.fixture(scope="module", params=model_params("argmax"))
def argmax_export(request, export_dir):
    name = request.param
    path = export(
        name, format="onnx", imgsz=NONSQUARE_SIZE, batch=2, argmax=True, out=export_dir / f"{name}_argmax.onnx"
    )
    return name, path


def test_argmax_output(argmax_export):
    name, path = argmax_export
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    check_tensorrt_ops(proto)
    assert "ArgMax" in {n.op_type for n in proto.graph.node}
    model = build_model(name)
    x = torch.randn(2, 3, *NONSQUARE_SIZE)
    labels = _run(path, x)
    assert labels.dtype == torch.int32 and labels.shape == (2, *NONSQUARE_SIZE)
    expected = model.predict(x)  # the model contract: logits upsampled bilinearly to input size, argmax
    agreement = (labels.long() == expected).float().mean().item()
    assert agreement >= 0.999, f"{name}: in-graph argmax agrees with model.predict on {agreement:.4%} of pixels"
    assert read_sidecar(path)["outputs"][0]["dtype"] == "int32"


# ---------------------------------------------------------------------------------------------------- dynamic
@pytest.fixture(scope="module", params=model_params("dynamic"))
def dynamic_export(request, export_dir):
    name = request.param
    path = export(
        name,
        format="onnx",
        imgsz=STATIC_SIZE,
        batch=2,
        dynamic=True,
        min_shape=(1, 32, 32),
        max_shape=(4, 128, 128),
        out=export_dir / f"{name}_dynamic.onnx",
    )
    return name, path


def test_dynamic_axes_and_parity(dynamic_export):
    name, path = dynamic_export
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    check_tensorrt_ops(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_value") for d in dims] == [False, True, False, False], "batch, H, W must be symbolic"
    model = build_model(name)
    # min, opt, max of the profile and non-square shapes in between (one ONNX file serves them all).
    for b, h, w in [(1, 32, 32), (2, 64, 64), (3, 64, 96), (1, 128, 64), (4, 128, 128)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = model(x)
        _assert_logits_parity(ref, _run(path, x))
    profile = read_sidecar(path)["inputs"][0]["profile"]
    assert profile == {"min": [1, 32, 32], "opt": [2, 64, 64], "max": [4, 128, 128]}
    assert "--minShapes=images:1x3x32x32" in read_sidecar(path)["trtexec"]


def test_deploy_module_argmax_matches_predict():
    """The in-graph post-processing (constant-scale Resize + argmax) is the model contract's `predict`."""
    model = build_model("fpn_resnet18")
    x = torch.randn(2, 3, 64, 96)
    for dtype, torch_dtype in (("int32", torch.int32), ("uint8", torch.uint8)):
        labels = DeployModule(model, argmax=True, labels_dtype=dtype)(x)
        assert labels.dtype == torch_dtype
        np.testing.assert_array_equal(labels.long().numpy(), model.predict(x).numpy())


# ------------------------------------------------------------------------------------ bench provider, fp16
def test_export_onnx_session_for_bench():
    """`fastseg bench`'s onnxruntime provider: a session over a temporary export at the images' shape."""
    from fastseg.bench.runner import export_onnx_session

    images = torch.randn(1, 3, *STATIC_SIZE)
    session = export_onnx_session("fpn_resnet18", images, num_classes=5)
    (out,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    assert out.shape == (1, 5, STATIC_SIZE[0] // 4, STATIC_SIZE[1] // 4)
    assert session.get_providers()[-1] == "CPUExecutionProvider"


@pytest.mark.slow
def test_half_export_verifies_with_fp16_thresholds(export_dir):
    path = export("fpn_resnet18", imgsz=STATIC_SIZE, half=True, out=export_dir / "half.onnx")
    proto = onnx.load(str(path))
    check_tensorrt_ops(proto)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays fp32
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    report = verify(path, num_images=8, num_random=1)
    assert report.precision == "fp16" and report.thresholds.min_cosine == 0.99
    assert report.passed, report.format()
