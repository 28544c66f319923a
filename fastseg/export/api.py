"""`export`: one call from a registered model (or module) to a deployable artefact plus its sidecar JSON.

Order of work, chosen so that a mistake costs nothing: validate the options, check that no output exists (unless
``force``) and that the checkpoint exists, build the model, check the sizes against its stride, and only then run
the (slow) export. Every file is written to a temporary name and renamed, so an export that fails half-way leaves
what was on disk untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .onnx import DEFAULT_OPSET, MIN_OPSET, TENSORRT_MAX_OPSET, export_onnx_file
from .sidecar import collect_versions, sidecar_path, write_sidecar

__all__ = ["FORMATS", "LABEL_DTYPES", "DeployModule", "ShapeSpec", "build_model", "export", "resolve_shapes"]

FORMATS = ("onnx", "engine", "aoti")
_SUFFIX = {"onnx": ".onnx", "engine": ".engine", "aoti": ".pt2"}
LABEL_DTYPES = {"int32": torch.int32, "uint8": torch.uint8}
# Weights of a model exported without a checkpoint are drawn under this seed, so `fastseg verify` can rebuild the
# same random model (recorded in the sidecar as weights.init_seed).
INIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Input shapes of an artefact: (B, H, W) triplets; min == opt == max when static."""

    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    @property
    def dynamic_batch(self) -> bool:
        return self.min[0] != self.max[0]

    @property
    def dynamic_hw(self) -> bool:
        return self.min[1:] != self.max[1:]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


class DeployModule(nn.Module):
    """What gets exported: the model, optionally followed by upsampling to input size and an in-graph argmax.

    The upsampling uses the constant factor ``output_stride`` (export sizes are multiples of it), so ONNX gets a
    ``Resize`` with constant scales, which TensorRT accepts for dynamic shapes (a size computed from the input's
    shape is what onnx/onnx-tensorrt#423 trips on). Labels are cast to int32 or uint8: TensorRT has no int64 output
    worth using and uint8 quarters the copy back to the host.
    """

    def __init__(self, model: nn.Module, argmax: bool = False, labels_dtype: str = "int32", half: bool = False):
        super().__init__()
        self.model = model
        self.argmax = argmax
        self.labels_dtype = LABEL_DTYPES[labels_dtype]
        self.half_precision = half
        self.stride = int(model.pretrained_cfg.output_stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Inputs and logits stay fp32 at the boundary in every precision: the same pre-processing serves all
        # artefacts, and fp16 compute happens inside.
        x = images.half() if self.half_precision else images
        logits = self.model(x)
        if not self.argmax:
            return logits.float()
        if self.stride != 1:
            logits = F.interpolate(logits, scale_factor=float(self.stride), mode="bilinear", align_corners=False)
        return logits.argmax(1).to(self.labels_dtype)


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{what} must be an int or (H, W), got {value!r}")
    return values  # type: ignore[return-value]


def _triplet(value: Sequence[int] | None, batch: int, what: str) -> tuple[int, int, int] | None:
    """(H, W) or (B, H, W) -> (B, H, W); B defaults to ``batch``."""
    if value is None:
        return None
    values = tuple(int(v) for v in value)
    if len(values) == 2:
        return (batch, *values)
    if len(values) == 3:
        return values  # type: ignore[return-value]
    raise ValueError(f"{what} must be (H, W) or (B, H, W), got {value!r}")


def _nearest(size: int, multiple: int) -> str:
    lo = max(multiple, size // multiple * multiple)
    hi = lo if lo >= size else lo + multiple
    return str(lo) if lo == hi else f"{lo} or {hi}"


def _round_up(size: int, multiple: int) -> int:
    return max(multiple, math.ceil(size / multiple) * multiple)


def resolve_shapes(
    imgsz: int | Sequence[int],
    batch: int,
    dynamic: bool,
    divisible_by: int,
    min_shape: Sequence[int] | None = None,
    opt_shape: Sequence[int] | None = None,
    max_shape: Sequence[int] | None = None,
) -> ShapeSpec:
    """Turn the user's size options into a checked `ShapeSpec`.

    Static: every shape is ``(batch, H, W)``. Dynamic: the opt shape is ``(batch, H, W)`` unless given, min defaults
    to ``(1, H/2, W/2)`` and max to ``(batch, 2H, 2W)`` (rounded up to ``divisible_by``); batch ranges over
    ``[min B, max B]``.

    Raises:
        ValueError: a size that is not a positive multiple of ``divisible_by`` (naming the nearest valid sizes), a
            batch below 1, shapes given without ``dynamic``, or min <= opt <= max violated.
    """
    h, w = _pair(imgsz, "imgsz")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    given = {"min_shape": min_shape, "opt_shape": opt_shape, "max_shape": max_shape}
    if not dynamic and any(v is not None for v in given.values()):
        names = [k for k, v in given.items() if v is not None]
        raise ValueError(f"{', '.join(names)} only apply to dynamic exports: pass dynamic=True (--dynamic)")
    opt = _triplet(opt_shape, batch, "opt_shape") or (batch, h, w)
    if dynamic:
        lo = _triplet(min_shape, 1, "min_shape") or (
            1,
            _round_up(opt[1] // 2, divisible_by),
            _round_up(opt[2] // 2, divisible_by),
        )
        hi = _triplet(max_shape, batch, "max_shape") or (max(batch, opt[0]), 2 * opt[1], 2 * opt[2])
    else:
        lo = hi = opt
    for label, shape in (("min", lo), ("opt", opt), ("max", hi)):
        b, sh, sw = shape
        if b < 1:
            raise ValueError(f"{label} batch must be >= 1, got {b}")
        for axis, size in (("height", sh), ("width", sw)):
            if size <= 0 or size % divisible_by:
                raise ValueError(
                    f"{label} {axis} {size} is not a multiple of {divisible_by} (the model's divisible_by: its "
                    f"stride); nearest valid {axis}: {_nearest(max(size, 1), divisible_by)}"
                )
    for i, axis in enumerate(("batch", "height", "width")):
        if not lo[i] <= opt[i] <= hi[i]:
            raise ValueError(f"{axis}: need min <= opt <= max, got {lo[i]}, {opt[i]}, {hi[i]}")
    return ShapeSpec(lo, opt, hi)


def _dynamic_shapes(spec: ShapeSpec, divisible_by: int) -> tuple[torch.Tensor, dict[str, dict[int, Any]] | None]:
    """Example input and ``torch.export`` dynamic_shapes for ``spec``."""
    if not spec.dynamic:
        return torch.randn(*spec.opt[:1], 3, *spec.opt[1:]), None
    Dim = torch.export.Dim
    dims: dict[int, Any] = {}
    example = list(spec.opt)
    if spec.dynamic_batch:
        dims[0] = Dim("batch", min=spec.min[0], max=spec.max[0])
        # An example of size 1 would specialise the batch to a constant; any size in range works for the trace.
        if example[0] == 1:
            example[0] = 2
    for axis, name in ((1, "height"), (2, "width")):
        lo, hi = spec.min[axis] // divisible_by, spec.max[axis] // divisible_by
        if lo == hi:
            continue
        dims[axis + 1] = divisible_by * Dim(f"{name}_{divisible_by}", min=lo, max=hi)
        if example[axis] // divisible_by == 1:  # the factor must not be 1 in the example either
            example[axis] = 2 * divisible_by
    return torch.randn(example[0], 3, example[1], example[2]), {"images": dims}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_model(
    model_name: str,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    init_seed: int | None = INIT_SEED,
    **kwargs: Any,
) -> nn.Module:
    """A registered model in eval mode on the CPU; weights from ``checkpoint`` or drawn under ``init_seed``."""
    from ..registry import create_model

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if num_classes is None and checkpoint is not None:
        num_classes = _num_classes_from_checkpoint(Path(checkpoint))
    with torch.random.fork_rng(devices=[]):
        if checkpoint is None and init_seed is not None:
            torch.manual_seed(init_seed)
        model = create_model(model_name, num_classes=num_classes, checkpoint_path=checkpoint, **kwargs)
    return model.eval()


def _num_classes_from_checkpoint(path: Path) -> int | None:
    """The class count a fastseg weights file records in its metadata, if it records one."""
    import json

    try:
        from ..checkpoint import read_metadata

        meta = read_metadata(path)
    except Exception:  # noqa: BLE001 - no readable metadata: the model's default applies, load_weights will judge
        return None
    for key in ("pretrained_cfg", "config"):
        if key in meta:
            try:
                value = json.loads(meta[key]).get("num_classes")
                return int(value) if value is not None else None
            except (ValueError, AttributeError, TypeError):
                pass
    if "num_classes" in meta:
        try:
            return int(meta["num_classes"])
        except ValueError:
            return None
    return None


def _with_suffix(path: Path, fmt: str) -> Path:
    """Add the format's extension to a path without one (``out="model"`` -> ``model.onnx``)."""
    return path.with_name(path.name + _SUFFIX[fmt]) if path.suffix == "" else path


def _output_paths(path: Path, fmt: str) -> list[Path]:
    """Every file an export writes: the artefact and its sidecar (and an engine's ONNX with its sidecar)."""
    paths = [path, sidecar_path(path)]
    if fmt == "engine":
        paths += [path.with_suffix(".onnx"), sidecar_path(path.with_suffix(".onnx"))]
    return paths


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass force=True (--force) to overwrite")


def default_name(model_name: str, spec: ShapeSpec, half: bool, argmax: bool, fmt: str) -> str:
    """``fpn_resnet18_64x96_b1_fp16_argmax.onnx``: the options that change the artefact, encoded in its name."""
    b, h, w = spec.opt
    shape = (
        f"{h}x{w}_b{b}"
        if not spec.dynamic
        else (f"dyn_{spec.min[1]}x{spec.min[2]}-{spec.max[1]}x{spec.max[2]}_b{spec.min[0]}-{spec.max[0]}")
    )
    parts = [model_name, shape, "fp16" if half else "fp32"] + (["argmax"] if argmax else [])
    return "_".join(parts) + _SUFFIX[fmt]


def export(
    model_or_name: str | nn.Module,
    format: str = "onnx",
    imgsz: int | Sequence[int] = 512,
    batch: int = 1,
    dynamic: bool = False,
    min_shape: Sequence[int] | None = None,
    opt_shape: Sequence[int] | None = None,
    max_shape: Sequence[int] | None = None,
    half: bool = False,
    argmax: bool = False,
    labels_dtype: str = "int32",
    opset: int | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    int8: bool = False,
    workspace_gib: float | None = None,
    tensorrt_check: bool = True,
) -> Path:
    """Export a model to ONNX, a TensorRT engine or an AOTInductor package, with a sidecar JSON beside it.

    Args:
        model_or_name: a registered model name (built on the CPU, weights from ``checkpoint``) or a fastseg model.
        format: ``"onnx"``, ``"engine"`` (TensorRT plan, needs the ``tensorrt`` package) or ``"aoti"`` (``.pt2``).
        imgsz: input size, int or (H, W); the opt shape. Must be a multiple of the model's ``divisible_by``.
        batch: batch size (static) or the largest batch (dynamic).
        dynamic: dynamic batch and spatial size over min_shape..max_shape (see `resolve_shapes` for defaults).
        min_shape, opt_shape, max_shape: (H, W) or (B, H, W) profile shapes of a dynamic export.
        half: fp16 weights and compute (inputs and logits stay fp32 at the boundary).
        argmax: output class ids at input size (bilinear upsampling, then argmax in the graph) instead of logits.
        labels_dtype: ``"int32"`` or ``"uint8"`` (uint8 needs at most 256 classes).
        opset: ONNX opset (default 18; 17 is the minimum, 20 the maximum TensorRT 10.0 reads).
        out: artefact path; default ``<model>_<shape>_<precision>[_argmax].<ext>`` in the current folder.
        force: overwrite existing outputs. Without it an existing artefact or sidecar raises ``FileExistsError``.
        checkpoint: weights file (.safetensors, or .pt/.pth read with ``weights_only=True``).
        num_classes: class count when it differs from the default and the checkpoint does not record it.
        int8: TensorRT INT8 (engine format; see `fastseg.export.tensorrt.build_engine`).
        workspace_gib: TensorRT builder workspace limit.
        tensorrt_check: refuse ONNX graphs with operators TensorRT's parser does not support.

    Returns:
        The artefact path (its sidecar is ``<artefact>.json``; an engine also leaves its ``.onnx`` beside it).

    Raises:
        ValueError: unknown format or labels dtype, bad sizes (with the nearest valid sizes), bad opset, or a
            graph TensorRT cannot parse (`TensorRTCompatibilityError`).
        FileExistsError: an output exists and ``force`` is False (nothing was written or changed).
        FileNotFoundError: the checkpoint does not exist.
        ImportError: ``format="engine"`` without the ``tensorrt`` package.
    """
    # -- 1. options that need nothing but themselves ---------------------------------------------------------------
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if labels_dtype not in LABEL_DTYPES:
        raise ValueError(f"labels_dtype must be one of {tuple(LABEL_DTYPES)}, got {labels_dtype!r}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: fastseg exports opset >= {MIN_OPSET} (LayerNormalization)")
    if tensorrt_check and format != "aoti" and opset > TENSORRT_MAX_OPSET:
        raise ValueError(
            f"opset {opset} is above {TENSORRT_MAX_OPSET}, the highest TensorRT 10.0's ONNX parser reads; use "
            f"opset <= {TENSORRT_MAX_OPSET}, or tensorrt_check=False (--no-tensorrt-check) for other runtimes"
        )
    if int8 and format != "engine":
        raise ValueError("int8 applies to TensorRT engines only (format='engine')")
    if half and format == "aoti":
        raise ValueError("half is not supported for AOTInductor packages here: fp16 kernels need a GPU build")
    if isinstance(model_or_name, str):
        model_name = model_or_name
        from ..registry import is_model

        if not is_model(model_name):
            from ..registry import create_model

            create_model(model_name)  # raises the registry's ValueError with close-match suggestions
    elif isinstance(model_or_name, nn.Module):
        model_name = getattr(model_or_name, "model_name", type(model_or_name).__name__)
    else:
        raise TypeError(f"model_or_name must be a registered name or an nn.Module, got {type(model_or_name).__name__}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if out is not None:  # known paths are checked now; default names need the model's stride (step 3)
        _refuse_existing(_output_paths(_with_suffix(Path(out), format), format), force)
    if format == "engine":
        from .tensorrt import require_tensorrt

        require_tensorrt()  # before any slow work: say now that the engine must be built elsewhere

    # -- 2. the model and the sizes it accepts ---------------------------------------------------------------------
    if isinstance(model_or_name, str):
        model = build_model(model_name, checkpoint, num_classes)
        init_seed = INIT_SEED if checkpoint is None else None
    else:
        model = copy.deepcopy(model_or_name).eval()  # the caller's module keeps its mode, dtype and weights
        if checkpoint is not None:
            from ..checkpoint import load_weights

            load_weights(model, Path(checkpoint))
        init_seed = None
    cfg = model.pretrained_cfg
    spec = resolve_shapes(imgsz, batch, dynamic, cfg.divisible_by, min_shape, opt_shape, max_shape)
    if argmax and labels_dtype == "uint8" and cfg.num_classes > 256:
        raise ValueError(f"labels_dtype='uint8' holds at most 256 classes; the model has {cfg.num_classes}")

    # -- 3. output paths: refuse to overwrite before doing any work -----------------------------------------------
    path = _with_suffix(
        Path(out) if out is not None else Path(default_name(model_name, spec, half, argmax, format)), format
    )
    _refuse_existing(_output_paths(path, format), force)
    onnx_path = path.with_suffix(".onnx") if format == "engine" else None
    path.parent.mkdir(parents=True, exist_ok=True)

    # -- 4. export -------------------------------------------------------------------------------------------------
    module = DeployModule(model.half() if half else model, argmax, labels_dtype, half).eval()
    example, dynamic_shapes = _dynamic_shapes(spec, cfg.divisible_by)
    output_name = "labels" if argmax else "logits"
    sidecar: dict[str, Any] = {
        "model": model_name,
        "format": format,
        "artefact": path.name,
        "pretrained_cfg": cfg.to_dict(),
        "precision": "fp16" if half else "fp32",
        "inputs": [
            {
                "name": "images",
                "dtype": "float32",
                "layout": "NCHW",
                "shape": [
                    "batch" if spec.dynamic_batch else spec.opt[0],
                    3,
                    "height" if spec.dynamic_hw else spec.opt[1],
                    "width" if spec.dynamic_hw else spec.opt[2],
                ],
                "profile": spec.to_dict(),
                "divisible_by": cfg.divisible_by,
                "preprocess": "RGB in [0, 1], then (x - mean) / std per channel (pretrained_cfg.mean / std)",
            }
        ],
        "outputs": [_output_spec(output_name, cfg, spec, argmax, labels_dtype)],
        "weights": {
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
            "sha256": _file_sha256(Path(checkpoint)) if checkpoint is not None else None,
            "init_seed": init_seed,
        },
        "export": {
            "opset": opset if format != "aoti" else None,
            "dynamic": spec.dynamic,
            "argmax": argmax,
            "labels_dtype": labels_dtype if argmax else None,
            "half": half,
        },
        "versions": collect_versions(),
    }
    if format in ("onnx", "engine"):
        target = onnx_path or path
        counts = export_onnx_file(module, example, target, dynamic_shapes, opset, (output_name,), tensorrt_check)
        sidecar["export"]["onnx_ops"] = counts
        if format == "onnx":
            from .tensorrt import trtexec_command

            sidecar["trtexec"] = trtexec_command(target, target.with_suffix(".engine"), spec, fp16=half)
            write_sidecar(path, sidecar)
            return path
        from .tensorrt import build_engine, trtexec_command

        onnx_sidecar = dict(sidecar, format="onnx", artefact=target.name)
        onnx_sidecar["trtexec"] = trtexec_command(target, path, spec, fp16=half, int8=int8)
        write_sidecar(target, onnx_sidecar)
        info = build_engine(
            target, path, fp16=half, int8=int8, profiles=[spec], workspace_gib=workspace_gib, force=True
        )
        sidecar["tensorrt"] = info
        sidecar["onnx"] = target.name
        sidecar["trtexec"] = onnx_sidecar["trtexec"]
        write_sidecar(path, sidecar)
        return path
    from .aoti import compile_aoti

    compile_aoti(module, example, path, dynamic_shapes)
    write_sidecar(path, sidecar)
    return path


def _output_spec(name: str, cfg: Any, spec: ShapeSpec, argmax: bool, labels_dtype: str) -> dict[str, Any]:
    b = "batch" if spec.dynamic_batch else spec.opt[0]
    if argmax:
        h = "height" if spec.dynamic_hw else spec.opt[1]
        w = "width" if spec.dynamic_hw else spec.opt[2]
        return {
            "name": name,
            "dtype": labels_dtype,
            "shape": [b, h, w],
            "meaning": "class ids at input size (bilinear upsampling of the logits, then argmax)",
        }
    s = cfg.output_stride
    h = f"height/{s}" if spec.dynamic_hw else spec.opt[1] // s
    w = f"width/{s}" if spec.dynamic_hw else spec.opt[2] // s
    return {
        "name": name,
        "dtype": "float32",
        "shape": [b, cfg.num_classes, h, w],
        "stride": s,
        "meaning": "class logits at 1/stride of the input; upsample bilinearly (align_corners=False), argmax",
    }
