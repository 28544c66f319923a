"""TensorRT: operator list, version-dependent build logic (with a stand-in module), trtexec command, real builds."""

from __future__ import annotations

from unittest import mock

import onnx
import pytest
from onnx import helper

from fastseg.export import (
    TensorRTCompatibilityError,
    build_engine,
    build_plan,
    check_tensorrt_ops,
    resolve_shapes,
    tensorrt_supported_ops,
    trtexec_command,
)

# Rows of the operator matrix the list cites (onnx-tensorrt docs/operators.md at the 10.1 GA tag), written out here
# so that the test does not take its expectation from the file it checks: 'Y' rows the exporter relies on or that are
# easy to lose, and 'N' rows that must never be reported as supported.
_SUPPORTED_IN_TRT10 = (
    "Conv",
    "Resize",
    "LayerNormalization",
    "InstanceNormalization",
    "ArgMax",
    "Cast",
    "MatMul",
    "Erf",
    "Einsum",
    "GridSample",
    "NonMaxSuppression",
    "TopK",
    "ScatterElements",
    "Loop",
)
_UNSUPPORTED_IN_TRT10 = (
    "Unique",
    "Bernoulli",
    "BitShift",
    "SequenceAt",
    "SplitToSequence",
    "StringNormalizer",
    "TfIdfVectorizer",
    "ConvInteger",
    "MatMulInteger",
)
_SUPPORTED_ROWS = 150  # the 'Y' rows of that table: a file cut short or a parser that drops rows changes the count


def test_operator_list_names_its_source_and_has_the_usual_ops():
    from fastseg.export.onnx import _OPS_FILE

    header = _OPS_FILE.read_text().splitlines()[:4]
    assert any("onnx/onnx-tensorrt" in line and "docs/operators.md" in line for line in header)
    ops = tensorrt_supported_ops()
    assert len(ops) == _SUPPORTED_ROWS
    missing = [op for op in _SUPPORTED_IN_TRT10 if op not in ops]
    assert not missing, f"supported by TensorRT 10 but absent from the list: {missing}"
    wrongly_listed = [op for op in _UNSUPPORTED_IN_TRT10 if op in ops]
    assert not wrongly_listed, f"not supported by TensorRT 10 but listed: {wrongly_listed}"
    # The restriction column is parsed too (check_tensorrt_ops shows it in its error message).
    assert "Antialiasing is not supported" in ops["Resize"] and "3840" in ops["TopK"] and ops["Conv"] == ""


def _model(nodes, opset=18):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("fastseg", 1)])


def test_check_lists_offending_ops():
    ok = _model([helper.make_node("Relu", ["x"], ["y"])])
    assert check_tensorrt_ops(ok) == {"Relu": 1}
    bad = _model(
        [
            helper.make_node("Unique", ["x"], ["u"]),
            helper.make_node("vq_nearest", ["u"], ["v"], domain="fastseg"),
            helper.make_node("vq_nearest", ["v"], ["y"], domain="fastseg"),
        ]
    )
    with pytest.raises(TensorRTCompatibilityError, match=r"Unique \(x1\).*fastseg::vq_nearest \(x2\)") as err:
        check_tensorrt_ops(bad)
    assert "DECOMPOSITIONS" in str(err.value)


def test_check_looks_inside_subgraphs_and_checks_opset():
    inner = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["z"])],
        "body",
        [],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
    )
    cond = helper.make_node("If", ["x"], ["y"], then_branch=inner, else_branch=inner)
    with pytest.raises(TensorRTCompatibilityError, match=r"Unique \(x2\)"):
        check_tensorrt_ops(_model([cond]))
    with pytest.raises(TensorRTCompatibilityError, match="opset 21 is above 20"):
        check_tensorrt_ops(_model([helper.make_node("Relu", ["x"], ["y"])], opset=21))


# ------------------------------------------------------------------------------------------- version logic
def test_build_plan_tensorrt10():
    assert build_plan(10) == build_plan(10, strongly_typed=False)
    plan = build_plan(10, fp16=True, int8=True)
    assert not plan.strongly_typed and plan.builder_flags == ("FP16", "INT8") and plan.calibrate
    assert build_plan(10, strongly_typed=True).strongly_typed
    with pytest.raises(ValueError, match="strongly typed networks take their precision from the ONNX"):
        build_plan(10, fp16=True, strongly_typed=True)
    with pytest.raises(ValueError, match="TensorRT 8.x is not supported"):
        build_plan(8)


def test_build_plan_tensorrt11_is_strongly_typed_without_calibrators():
    plan = build_plan(11, fp16=True)
    assert plan.strongly_typed and plan.builder_flags == () and not plan.calibrate
    with pytest.raises(ValueError, match="removed implicit INT8 calibration.*Q/DQ"):
        build_plan(11, int8=True)
    with pytest.raises(ValueError, match="removed weakly-typed networks"):
        build_plan(11, strongly_typed=False)


def test_trtexec_command():
    dyn = resolve_shapes((512, 1024), 4, True, 32, min_shape=(1, 256, 512), max_shape=(4, 1024, 2048))
    cmd = trtexec_command("m.onnx", "m.engine", dyn, fp16=True, workspace_gib=1.5, trt_major=10)
    assert cmd == (
        "trtexec --onnx=m.onnx --saveEngine=m.engine --minShapes=images:1x3x256x512 "
        "--optShapes=images:4x3x512x1024 --maxShapes=images:4x3x1024x2048 --fp16 "
        "--memPoolSize=workspace:1536M"
    )
    static = resolve_shapes((64, 96), 1, False, 32)
    assert (
        trtexec_command("a b.onnx", "m.engine", static, trt_major=10)
        == "trtexec '--onnx=a b.onnx' --saveEngine=m.engine"
    )
    # TensorRT 11: the fp16-typed ONNX carries the precision; strongly typed, no --fp16.
    assert (
        trtexec_command("m.onnx", "m.engine", static, fp16=True, trt_major=11)
        == "trtexec --onnx=m.onnx --saveEngine=m.engine --stronglyTyped"
    )
    assert trtexec_command("m.onnx", "m.engine", static, int8=True, trt_major=10).endswith("--int8")


def _fake_trt(version: str, parses: bool = True) -> mock.MagicMock:
    """A stand-in for the `tensorrt` module: records the builder calls, returns b"PLAN" as the plan."""
    trt = mock.MagicMock(name="tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 3
    builder = trt.Builder.return_value
    builder.build_serialized_network.return_value = b"PLAN"
    parser = trt.OnnxParser.return_value
    parser.parse_from_file.return_value = parses
    parser.num_errors = 0 if parses else 1
    parser.get_error.return_value = "In node 7 (Unique): unsupported"
    return trt


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])]), str(path))
    return path


def test_build_engine_tensorrt10_fp16_dynamic(onnx_file, tmp_path):
    trt = _fake_trt("10.3.0")
    spec = resolve_shapes((64, 96), 2, True, 32)
    info = build_engine(onnx_file, tmp_path / "m.engine", fp16=True, profiles=[spec], workspace_gib=2, trt=trt)
    assert (tmp_path / "m.engine").read_bytes() == b"PLAN"  # the plain plan, no metadata header
    builder = trt.Builder.return_value
    builder.create_network.assert_called_once_with(0)  # weakly typed
    config = builder.create_builder_config.return_value
    config.set_flag.assert_called_once_with(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit.assert_called_once_with(trt.MemoryPoolType.WORKSPACE, 2 << 30)
    profile = builder.create_optimization_profile.return_value
    profile.set_shape.assert_called_once_with("images", (1, 3, 32, 64), (2, 3, 64, 96), (2, 3, 128, 192))
    assert info["builder_flags"] == ["FP16"] and not info["strongly_typed"] and info["plan_bytes"] == 4


def test_build_engine_tensorrt11_fp16_is_strongly_typed(onnx_file, tmp_path):
    trt = _fake_trt("11.0.1")
    info = build_engine(onnx_file, tmp_path / "m.engine", fp16=True, trt=trt)
    builder = trt.Builder.return_value
    builder.create_network.assert_called_once_with(0)  # strongly typed is the only mode: no flag to pass
    builder.create_builder_config.return_value.set_flag.assert_not_called()
    assert info["strongly_typed"] and info["builder_flags"] == []
    with pytest.raises(ValueError, match="Q/DQ"):
        build_engine(onnx_file, tmp_path / "q.engine", int8=True, trt=_fake_trt("11.0.1"))
    assert not (tmp_path / "q.engine").exists()


def test_build_engine_strongly_typed_on_tensorrt10_sets_the_flag(onnx_file, tmp_path):
    trt = _fake_trt("10.8.0")
    build_engine(onnx_file, tmp_path / "m.engine", strongly_typed=True, trt=trt)
    trt.Builder.return_value.create_network.assert_called_once_with(1 << 3)


def test_build_engine_refuses_overwrite_and_reports_parser_errors(onnx_file, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="force"):
        build_engine(onnx_file, engine, trt=_fake_trt("10.3.0"))
    assert engine.read_bytes() == b"old"
    with pytest.raises(ValueError, match=r"parser rejected .*Unique"):
        build_engine(onnx_file, tmp_path / "n.engine", trt=_fake_trt("10.3.0", parses=False))
    assert not (tmp_path / "n.engine").exists()


# ------------------------------------------------------------------------------------- real TensorRT (GPU)
@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.export
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_engine_build_and_verify(tmp_path, half):
    from fastseg.export import export, verify

    path = export(
        "fpn_resnet18", format="engine", imgsz=(64, 96), batch=2, dynamic=True, half=half, out=tmp_path / "m.engine"
    )
    assert path.read_bytes()[:4] != b'{"' and (tmp_path / "m.onnx").is_file()
    report = verify(path, num_images=8, device="cuda")
    assert report.passed, report.format()
