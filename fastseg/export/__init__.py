"""fastseg.export: deployable artefacts (ONNX, TensorRT engines, AOTInductor packages) and their verification.

    >>> from fastseg.export import export, verify
    >>> path = export("fpn_resnet18", format="onnx", imgsz=(512, 1024), dynamic=True, checkpoint="model.safetensors")
    >>> print(verify(path).format())

Every artefact gets a sidecar JSON (``<artefact>.json``: classes, palette, mean/std, input/output spec, versions,
the equivalent ``trtexec`` command); engines stay plain TensorRT plans. ONNX graphs hold standard operators only
(fastseg's fused ops are exported as their reference decompositions) and are checked against the operators
TensorRT's ONNX parser supports (``tensorrt_onnx_operators.txt``, source named in its header).
"""

from .aoti import compile_aoti, load_aoti
from .api import FORMATS, DeployModule, ShapeSpec, export, resolve_shapes
from .onnx import (
    TensorRTCompatibilityError,
    check_tensorrt_ops,
    tensorrt_supported_ops,
)
from .sidecar import read_sidecar, sidecar_path
from .tensorrt import build_engine, build_plan, require_tensorrt, trtexec_command
from .verify import THRESHOLDS, Thresholds, VerifyReport, verify

__all__ = [
    "FORMATS",
    "THRESHOLDS",
    "DeployModule",
    "ShapeSpec",
    "TensorRTCompatibilityError",
    "Thresholds",
    "VerifyReport",
    "build_engine",
    "build_plan",
    "check_tensorrt_ops",
    "compile_aoti",
    "export",
    "load_aoti",
    "read_sidecar",
    "require_tensorrt",
    "resolve_shapes",
    "sidecar_path",
    "tensorrt_supported_ops",
    "trtexec_command",
    "verify",
]
