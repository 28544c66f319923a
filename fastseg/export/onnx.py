"""ONNX export through ``torch.export`` + ``torch.onnx.export(dynamo=True)``, and the TensorRT operator check.

Recipe (checked on this kind of machine, see DESIGN.md "Export"):

1. ``torch.export.export(module, args, dynamic_shapes=...)`` with stride-aware spatial dims: a free height makes the
   backbone's guards fail (pytorch/pytorch#124507), so H and W are ``divisible_by * Dim(...)``. The example batch is
   at least 2 when the batch is dynamic, because an example of size 1 specialises the dim to a constant.
2. ``ep.run_decompositions(fastseg.kernels.DECOMPOSITIONS)``: every ``fastseg::<op>`` custom op is replaced by its
   plain-PyTorch reference, so the ONNX file holds standard operators only (no custom domain, no plugin).
3. ``torch.onnx.export(ep, ..., dynamo=True, opset_version=opset)``; then ``onnx.checker`` (full check) and, unless
   disabled, `check_tensorrt_ops` against the operator list shipped beside this file.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_OPSET",
    "TENSORRT_MAX_OPSET",
    "TensorRTCompatibilityError",
    "check_tensorrt_ops",
    "export_onnx_file",
    "tensorrt_supported_ops",
]

# Opset 17 is the first with LayerNormalization (fp16 LayerNorm overflow otherwise, open-mmlab/mmdeploy#2477); the
# dynamo exporter's own default is 18. TensorRT 10.0's parser reads opsets 9-20 (the operator list's source page).
DEFAULT_OPSET = 18
MIN_OPSET = 17
TENSORRT_MAX_OPSET = 20
_OPS_FILE = Path(__file__).with_name("tensorrt_onnx_operators.txt")
_STANDARD_DOMAINS = ("", "ai.onnx")


class TensorRTCompatibilityError(ValueError):
    """The ONNX graph holds operators (or an opset) that TensorRT's ONNX parser does not import."""


@functools.lru_cache(maxsize=1)
def tensorrt_supported_ops() -> dict[str, str]:
    """Operator name -> restriction note, from ``tensorrt_onnx_operators.txt`` (source named in its header)."""
    ops: dict[str, str] = {}
    for line in _OPS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _types, *rest = line.split("\t") + [""]
        ops[name.strip()] = rest[0].strip() if rest else ""
    return ops


def _iter_nodes(graph: Any) -> Iterable[Any]:
    """Every node of ``graph`` including the bodies of If / Loop / Scan sub-graphs."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_nodes(sub)


def check_tensorrt_ops(model: Any, max_opset: int = TENSORRT_MAX_OPSET) -> dict[str, int]:
    """Raise unless every operator of ``model`` is one that TensorRT's ONNX parser imports.

    Args:
        model: an ``onnx.ModelProto`` or a path to an ``.onnx`` file.
        max_opset: highest default-domain opset accepted (TensorRT 10.0 reads 9-20; newer releases read more).

    Returns:
        Operator counts ``{"Conv": 20, ...}`` of the graph (local functions included), for reports.

    Raises:
        TensorRTCompatibilityError: listing each offending operator (with its domain and count), or the opset.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    supported = tensorrt_supported_ops()
    local_functions = {(f.domain, f.name) for f in model.functions}
    counts: collections.Counter[str] = collections.Counter()
    bad: collections.Counter[str] = collections.Counter()
    graphs = [model.graph] + [f for f in model.functions]
    for graph in graphs:
        for node in _iter_nodes(graph):
            if (node.domain, node.op_type) in local_functions:
                continue  # a call into a local function: its body is checked on its own
            counts[node.op_type] += 1
            if node.domain not in _STANDARD_DOMAINS:
                bad[f"{node.domain}::{node.op_type}"] += 1
            elif node.op_type not in supported:
                bad[node.op_type] += 1
    problems = []
    if bad:
        listed = ", ".join(f"{op} (x{n})" for op, n in sorted(bad.items()))
        problems.append(
            f"operators TensorRT's ONNX parser does not support: {listed}. Custom-domain nodes mean a fastseg op "
            "was not decomposed (add its reference to fastseg.kernels.DECOMPOSITIONS); standard ones need a "
            "different formulation in the model"
        )
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), None)
    if opset is not None and opset > max_opset:
        problems.append(
            f"opset {opset} is above {max_opset}, the highest TensorRT 10.0's parser reads; export with "
            f"opset <= {max_opset} or raise max_opset when the target runs a newer TensorRT"
        )
    if problems:
        raise TensorRTCompatibilityError(
            "; ".join(problems) + f" (operator list: {_OPS_FILE.name}, from onnx/onnx-tensorrt docs/operators.md)"
        )
    return dict(counts)


def export_onnx_file(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    dynamic_shapes: dict[str, dict[int, Any]] | None = None,
    opset: int = DEFAULT_OPSET,
    output_names: tuple[str, ...] = ("logits",),
    tensorrt_check: bool = True,
) -> dict[str, int]:
    """Export ``module(example)`` to an ONNX file at ``path`` (written whole or not at all).

    Args:
        module: an eval-mode module taking one ``images`` tensor.
        example: example input; for a dynamic batch its batch must be >= 2 (see the module docstring).
        path: destination ``.onnx`` file.
        dynamic_shapes: ``torch.export`` spec ``{"images": {0: Dim, 2: 32 * Dim, ...}}`` or None (static).
        opset: ONNX opset of the default domain.
        output_names: graph output names.
        tensorrt_check: run `check_tensorrt_ops` on the result.

    Returns:
        Operator counts of the exported graph.
    """
    import onnx

    from ..kernels import DECOMPOSITIONS

    if not MIN_OPSET <= opset:
        raise ValueError(f"opset {opset} is too old: fastseg exports opset >= {MIN_OPSET} (LayerNormalization)")
    path = Path(path)
    with torch.no_grad(), math_attention():
        ep = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    ep = ep.run_decompositions(DECOMPOSITIONS)
    program = torch.onnx.export(
        ep,
        (example,),
        None,
        dynamo=True,
        opset_version=opset,
        input_names=["images"],
        output_names=list(output_names),
        verbose=False,
    )
    # Write beside the destination and rename, so a failure never leaves half a file (or clobbers the old one).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        counts = check_tensorrt_ops(proto) if tensorrt_check else _op_counts(proto)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return counts


def _math_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (inference) as plain MatMul / Softmax, with contiguous outputs."""
    if dropout_p:
        raise ValueError("export traces eval-mode models: attention dropout must be 0")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)
    if is_causal:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ value


@contextlib.contextmanager
def math_attention():
    """Trace ``F.scaled_dot_product_attention`` as explicit MatMul / Softmax while exporting to ONNX.

    Why: SDPA's fake (meta) output on CPU is laid out (B, N, H, D), so a model's ``out.transpose(1, 2).reshape(..)``
    is recorded as a ``view``; the ONNX exporter later re-traces SDPA through its contiguous math decomposition and
    that ``view`` fails ("Cannot view a tensor with shape ..."; seen with GSS's Swin blocks on torch 2.14). Plain
    ops have the same strides in every trace, and ONNX computes attention with MatMul / Softmax anyway.
    """
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _math_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _op_counts(proto: Any) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for graph in [proto.graph] + list(proto.functions):
        for node in _iter_nodes(graph):
            counts[node.op_type] += 1
    return dict(counts)


def ort_providers(device: torch.device | str = "cpu") -> list[str]:
    """ONNX Runtime execution providers for ``device``: CUDA first when asked for and available, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = []
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers
