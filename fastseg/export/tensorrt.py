"""TensorRT engines from fastseg's ONNX files, through the TensorRT Python API (TensorRT 10 and 11).

The engine file is a plain serialised plan (``trtexec --loadEngine`` and the C++ runtime read it as is); all
metadata goes to the sidecar JSON. Engines are specific to the GPU and TensorRT version that built them, so the
usual path is: export ONNX here, build on the target (``fastseg export --format engine`` there, or the
`trtexec_command` printed with every export).

Version differences handled here (NVIDIA/TensorRT README, 11.0): TensorRT 11 removed weakly-typed networks and
implicit INT8 (calibrators). So:

* TensorRT <= 10: fp16 is the ``BuilderFlag.FP16`` flag on a weakly typed network (or strongly typed on request);
  INT8 uses an entropy calibrator fed with shapes-world images (or your own batches).
* TensorRT >= 11: every network is strongly typed; fp16 comes from the fp16-typed ONNX that ``half=True`` exports,
  and INT8 needs an ONNX with explicit Q/DQ nodes (quantise it first, e.g. with NVIDIA ModelOpt).

TensorRT cannot be installed on fastseg's CI machines: everything here imports it lazily and
`require_tensorrt` explains what to do instead. The calls are type-checked all the same: ``scripts/test.sh`` runs mypy
on this file against the TensorRT 10 API stubs (the ``tensorrt-stubs`` package), so a misspelt TensorRT call fails
CI. Inside each function, ``trt_api`` is the ``tensorrt`` module for mypy (``TYPE_CHECKING``) and the module actually
given or imported at run time. Branches that only TensorRT 11 takes are marked ``# TensorRT 11``.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = [
    "BuildPlan",
    "build_engine",
    "build_plan",
    "require_tensorrt",
    "tensorrt_version",
    "trtexec_command",
]

_INSTALL_HINT = (
    "TensorRT's Python package is not installed (`pip install tensorrt`, or the wheel that ships with JetPack on "
    "Jetson). Without it, export ONNX (`fastseg export MODEL --format onnx ...`) and build the engine on the target "
    "GPU with trtexec: the command is printed by the export and stored in the sidecar JSON under 'trtexec'."
)


def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module, or raise ``ImportError`` saying how to get an engine anyway."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} (import error: {err})") from None
    if not hasattr(trt, "Builder"):  # e.g. a stubs-only `tensorrt` folder (tensorrt-stubs) importing as a namespace
        raise ImportError(
            f"{_INSTALL_HINT} (`import tensorrt` found {getattr(trt, '__path__', trt)}, which is not "
            f"TensorRT's Python package)"
        )
    return trt


def tensorrt_version(trt: Any | None = None) -> tuple[int, int]:
    """(major, minor) of the given or installed TensorRT module."""
    trt = trt if trt is not None else require_tensorrt()
    parts = str(trt.__version__).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """How a build is configured for one TensorRT major version (pure data, so it is testable without TensorRT)."""

    major: int
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names of trt.BuilderFlag members to set
    calibrate: bool  # attach an INT8 calibrator


def build_plan(major: int, fp16: bool = False, int8: bool = False, strongly_typed: bool | None = None) -> BuildPlan:
    """Decide network typing, builder flags and calibration for TensorRT ``major``.

    Args:
        major: TensorRT major version (10, 11, ...).
        fp16: allow fp16 (TRT <= 10: the FP16 flag; TRT >= 11: the ONNX must already be fp16-typed).
        int8: INT8 (TRT <= 10: implicit, with a calibrator; TRT >= 11: only explicit Q/DQ in the ONNX).
        strongly_typed: None chooses: strongly typed from 11 on (the only mode), weakly typed before.

    Raises:
        ValueError: a combination the version cannot build (strongly typed with precision flags, INT8 calibration
            on TensorRT >= 11, weakly typed on TensorRT >= 11, TensorRT older than 10).
    """
    if major < 10:
        raise ValueError(f"TensorRT {major}.x is not supported: fastseg builds with TensorRT 10 or newer")
    if major >= 11:  # TensorRT 11
        if strongly_typed is False:
            raise ValueError("TensorRT >= 11 removed weakly-typed networks: strongly_typed cannot be False")
        if int8:
            raise ValueError(
                "TensorRT >= 11 removed implicit INT8 calibration: quantise the ONNX with explicit Q/DQ nodes "
                "(e.g. NVIDIA ModelOpt) and build it strongly typed without int8=True"
            )
        # fp16 needs no flag: the fp16-typed ONNX (export half=True) carries the precision.
        return BuildPlan(major, True, (), False)
    typed = bool(strongly_typed)
    if typed and (fp16 or int8):
        raise ValueError(
            "strongly typed networks take their precision from the ONNX types; fp16/int8 flags do not apply "
            "(export with half=True for an fp16-typed ONNX, or build weakly typed)"
        )
    flags = tuple(name for name, on in (("FP16", fp16), ("INT8", int8)) if on)
    return BuildPlan(major, typed, flags, int8)


def _shape_str(batch_hw: Sequence[int]) -> str:
    b, h, w = batch_hw
    return f"{b}x3x{h}x{w}"


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    spec: Any = None,
    fp16: bool = False,
    int8: bool = False,
    strongly_typed: bool | None = None,
    workspace_gib: float | None = None,
    trt_major: int | None = None,
    input_name: str = "images",
) -> str:
    """The ``trtexec`` command line that builds the same engine as `build_engine`.

    Args:
        onnx_path, engine_path: files for ``--onnx`` and ``--saveEngine``.
        spec: a `fastseg.export.api.ShapeSpec` (or anything with ``min``/``opt``/``max`` (B, H, W) triplets and
            ``dynamic``); dynamic specs give ``--minShapes/--optShapes/--maxShapes``.
        fp16, int8, strongly_typed: as in `build_plan`.
        workspace_gib: ``--memPoolSize=workspace:<MiB>M``.
        trt_major: TensorRT major version of the target; default: the installed one, else 10 (JetPack 6 ships
            10.3), which is what most edge targets run.
    """
    if trt_major is None:
        try:
            trt_major = tensorrt_version()[0]
        except ImportError:
            trt_major = 10
    plan = build_plan(trt_major, fp16=fp16 and trt_major < 11, int8=int8, strongly_typed=strongly_typed)
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if spec is not None and getattr(spec, "dynamic", False):
        args += [
            f"--minShapes={input_name}:{_shape_str(spec.min)}",
            f"--optShapes={input_name}:{_shape_str(spec.opt)}",
            f"--maxShapes={input_name}:{_shape_str(spec.max)}",
        ]
    if plan.strongly_typed:
        args.append("--stronglyTyped")
    args += [f"--{flag.lower()}" for flag in plan.builder_flags]
    if workspace_gib is not None:
        args.append(f"--memPoolSize=workspace:{round(workspace_gib * 1024)}M")
    return " ".join(shlex.quote(str(a)) for a in args)


def _profile_triplets(profiles: Iterable[Any]) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    out: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
    for p in profiles:
        if hasattr(p, "min"):
            lo, opt, hi = p.min, p.opt, p.max
        else:
            lo, opt, hi = p
        out.append(tuple((b, 3, h, w) for b, h, w in (lo, opt, hi)))  # type: ignore[arg-type]
    return out


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    fp16: bool = False,
    int8: bool = False,
    strongly_typed: bool | None = None,
    profiles: Sequence[Any] = (),
    workspace_gib: float | None = None,
    calibration_batches: Iterable[Any] | None = None,
    calibration_cache: str | os.PathLike | None = None,
    force: bool = False,
    input_name: str = "images",
    trt: Any | None = None,
) -> dict[str, Any]:
    """Build a TensorRT engine (a plain serialised plan) from an ONNX file.

    Args:
        onnx_path: the ONNX file (from `fastseg.export.export`).
        engine_path: destination ``.engine`` file; never overwritten unless ``force``.
        fp16, int8, strongly_typed: precision, see `build_plan` for what each TensorRT version allows.
        profiles: optimisation profiles, each a `ShapeSpec` or a ``((B,H,W) min, opt, max)`` triple; needed for
            dynamic inputs (a static ONNX needs none).
        workspace_gib: builder workspace limit in GiB (None: TensorRT's default, the device memory).
        calibration_batches: INT8 on TensorRT <= 10: iterable of float32 (B, 3, H, W) tensors; default: 32 batches
            of shapes-world validation images at the profile's opt shape.
        calibration_cache: file to read / write the calibration cache (per device: do not share across GPUs).
        force: overwrite an existing engine file.
        trt: the TensorRT module to use (tests pass a stand-in); default ``import tensorrt``.

    Returns:
        Build facts for the sidecar: TensorRT version, typing, flags, profiles, GPU name, plan size.

    Raises:
        ImportError: TensorRT is not installed (the message says how to build with trtexec instead).
        FileExistsError: ``engine_path`` exists and ``force`` is False.
        ValueError: the ONNX does not parse (parser errors listed) or the precision options do not fit the version.
        RuntimeError: the builder returned no plan.
    """
    if TYPE_CHECKING:
        import tensorrt as trt_api
    else:
        trt_api = trt if trt is not None else require_tensorrt()
    engine_path = Path(engine_path)
    if engine_path.exists() and not force:
        raise FileExistsError(f"{engine_path} already exists; pass force=True (--force) to overwrite")
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    major, minor = tensorrt_version(trt_api)
    plan = build_plan(major, fp16=fp16 and major < 11, int8=int8, strongly_typed=strongly_typed)

    logger = trt_api.Logger(trt_api.Logger.WARNING)
    builder = trt_api.Builder(logger)
    flags = 0
    if plan.strongly_typed and major < 11:  # from 11 on strong typing is the only mode and needs no flag
        flags |= 1 << int(trt_api.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt_api.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt_api.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt_api.BuilderFlag, flag))
    triplets = _profile_triplets(profiles)
    first_profile = None
    for lo, opt, hi in triplets:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, lo, opt, hi)  # type: ignore[arg-type]  # pybind11 converts tuples to Dims
        config.add_optimization_profile(profile)
        first_profile = first_profile or profile
    if plan.calibrate:  # TensorRT <= 10 only (build_plan refuses INT8 calibration from 11 on)
        from .calibrator import make_calibrator

        input_shape = network.get_input(0).shape
        opt_shape = triplets[0][1] if triplets else tuple(input_shape[i] for i in range(len(input_shape)))
        config.int8_calibrator = make_calibrator(trt_api, opt_shape, calibration_batches, calibration_cache)
        if first_profile is not None:
            config.set_calibration_profile(first_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    data = bytes(serialized)
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    tmp.write_bytes(data)  # plain plan: no header, no metadata
    os.replace(tmp, engine_path)
    return {
        "version": str(trt_api.__version__),
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.builder_flags),
        "profiles": [[list(s) for s in t] for t in triplets],
        "workspace_gib": workspace_gib,
        "gpu": _gpu_name(),
        "plan_bytes": len(data),
        "version_major_minor": [major, minor],
    }


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return f"{props.name} (sm_{props.major}{props.minor})"
    except Exception:  # noqa: BLE001 - informational only: a broken CUDA set-up must not fail a finished build
        return None
    return None


def run_engine(engine_path: str | os.PathLike, images: Any, trt: Any | None = None) -> Any:
    """Run a fastseg engine on ``images`` (a CPU or CUDA float32 tensor); returns its one output on the CPU.

    Needs TensorRT and a CUDA GPU (through torch for the buffers). Used by `fastseg verify`.
    """
    import torch

    if TYPE_CHECKING:
        import tensorrt as trt_api
    else:
        trt_api = trt if trt is not None else require_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("running a TensorRT engine needs a CUDA GPU; none is visible")
    runtime = trt_api.Runtime(trt_api.Logger(trt_api.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise ValueError(f"TensorRT could not deserialise {engine_path} (built for another GPU or TensorRT?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt_api.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt_api.TensorIOMode.OUTPUT]
    x = images.to("cuda", torch.float32).contiguous()
    context.set_input_shape(inputs[0], tuple(x.shape))
    context.set_tensor_address(inputs[0], x.data_ptr())
    dtypes = {
        trt_api.DataType.FLOAT: torch.float32,
        trt_api.DataType.HALF: torch.float16,
        trt_api.DataType.INT32: torch.int32,
        trt_api.DataType.UINT8: torch.uint8,
        trt_api.DataType.INT64: torch.int64,
    }
    out_name = outputs[0]
    out_shape = context.get_tensor_shape(out_name)
    y = torch.empty(
        tuple(out_shape[i] for i in range(len(out_shape))),
        dtype=dtypes[engine.get_tensor_dtype(out_name)],
        device="cuda",
    )
    context.set_tensor_address(out_name, y.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"TensorRT failed to run {engine_path}")
    stream.synchronize()
    return y.cpu()
