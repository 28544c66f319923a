"""``fastseg export`` and ``fastseg verify`` (added to the main parser by `add_export_commands`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import parse_ints, parse_size

__all__ = ["add_export_commands", "cmd_export", "cmd_verify"]


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.api import export
    from ..export.sidecar import read_sidecar, sidecar_path

    path = _export_from_args(args, export)  # fastseg.cli.main reports the errors a user can cause
    sidecar = read_sidecar(path)
    print(f"artefact: {path}")
    print(f"sidecar:  {sidecar_path(path)}")
    if sidecar.get("onnx"):
        print(f"onnx:     {path.with_name(sidecar['onnx'])}")
    if sidecar.get("trtexec"):
        print(f"TensorRT engine on the target GPU (trtexec equivalent):\n  {sidecar['trtexec']}")
    print(f"check it: fastseg verify {path}")
    return 0


def _export_from_args(args: argparse.Namespace, export) -> Path:
    return export(
        args.model,
        format=args.format,
        imgsz=args.imgsz,
        batch=args.batch,
        dynamic=args.dynamic,
        min_shape=args.min,
        opt_shape=args.opt,
        max_shape=args.max,
        half=args.half,
        argmax=args.argmax,
        labels_dtype=args.labels_dtype,
        opset=args.opset,
        out=args.out,
        force=args.force,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        int8=args.int8,
        workspace_gib=args.workspace,
        tensorrt_check=not args.no_tensorrt_check,
    )


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from ..export.verify import THRESHOLDS, Thresholds, verify

    base = THRESHOLDS.get(args.precision or "fp32", THRESHOLDS["fp32"]) if args.precision else None
    thresholds = None
    if any(v is not None for v in (args.max_err, args.min_agreement, args.min_cosine, args.max_miou_delta)) or base:
        from ..export.sidecar import read_sidecar

        base = base or THRESHOLDS.get(read_sidecar(args.artefact).get("precision", "fp32"), THRESHOLDS["fp32"])
        thresholds = Thresholds(
            max_abs_err_rel=args.max_err if args.max_err is not None else base.max_abs_err_rel,
            min_cosine=args.min_cosine if args.min_cosine is not None else base.min_cosine,
            min_argmax_agreement=args.min_agreement if args.min_agreement is not None else base.min_argmax_agreement,
            max_miou_delta_points=(
                args.max_miou_delta if args.max_miou_delta is not None else base.max_miou_delta_points
            ),
        )
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    report = verify(
        args.artefact,
        model_name=args.model,
        checkpoint=args.checkpoint,
        num_images=args.images,
        num_random=args.random,
        thresholds=thresholds,
        device=device,
    )
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return 0 if report.passed else 1


def add_export_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``verify`` to the ``fastseg`` command's sub-parsers."""
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX, a TensorRT engine or an AOTInductor package (+ sidecar JSON)",
        description="Export a model for deployment. Writes the artefact and <artefact>.json (classes, palette, "
        "mean/std, input/output spec, versions); never overwrites without --force.",
    )
    p.add_argument("model", help="registered model name (fastseg list)")
    p.add_argument("--checkpoint", help="weights file (.safetensors or .pt/.pth)")
    p.add_argument("--format", choices=["onnx", "engine", "aoti"], default="onnx")
    p.add_argument(
        "--imgsz",
        type=parse_size,
        default=(512, 512),
        metavar="H,W",
        help="input size (the opt shape); a multiple of the model's stride",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size (largest batch when --dynamic)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial size (min..max)")
    p.add_argument("--min", type=parse_ints, metavar="[B,]H,W", help="smallest input of a dynamic export")
    p.add_argument("--opt", type=parse_ints, metavar="[B,]H,W", help="input TensorRT tunes for (default: batch, imgsz)")
    p.add_argument("--max", type=parse_ints, metavar="[B,]H,W", help="largest input of a dynamic export")
    p.add_argument("--half", action="store_true", help="fp16 weights and compute (I/O stays fp32)")
    p.add_argument("--int8", action="store_true", help="TensorRT INT8 (TensorRT <= 10 calibrates on shapes images)")
    p.add_argument("--argmax", action="store_true", help="output class ids at input size instead of logits")
    p.add_argument("--labels-dtype", choices=["int32", "uint8"], default="int32", help="class id type (--argmax)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18; TensorRT 10.0 reads up to 20)")
    p.add_argument("--workspace", type=float, metavar="GIB", help="TensorRT builder workspace limit")
    p.add_argument("--num-classes", type=int, help="class count, when the checkpoint does not record it")
    p.add_argument(
        "--no-tensorrt-check",
        action="store_true",
        help="allow operators TensorRT's ONNX parser lacks (ONNX Runtime-only deployments)",
    )
    p.add_argument("--out", help="artefact path (default: <model>_<shape>_<precision>[_argmax].<ext>)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "verify",
        help="compare an exported artefact with PyTorch; exit 1 past the thresholds",
        description="Run PyTorch and the artefact (ONNX Runtime / AOTInductor / TensorRT) on shapes-world images "
        "and random inputs; report max/median abs error, cosine, argmax agreement and mIoU change. "
        "Defaults: fp32 max abs err <= 1e-4 x logits scale and agreement >= 99.9%%; fp16 cosine >= "
        "0.99, agreement >= 99.5%%, |mIoU change| <= 1 point.",
    )
    p.add_argument("artefact", help="an .onnx, .pt2 or .engine file with its sidecar JSON beside it")
    p.add_argument("--model", help="model name (default: the sidecar's)")
    p.add_argument("--checkpoint", help="weights file (default: the sidecar's)")
    p.add_argument("--images", type=int, default=8, help="shapes-world images")
    p.add_argument("--random", type=int, default=2, help="random input batches at the opt shape")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="threshold set (default: the sidecar's)")
    p.add_argument("--max-err", type=float, help="max abs error relative to the logits scale")
    p.add_argument("--min-agreement", type=float, help="argmax agreement, a fraction (0.999)")
    p.add_argument("--min-cosine", type=float)
    p.add_argument("--max-miou-delta", type=float, help="|mIoU change| in points")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the report as JSON")
    p.set_defaults(func=cmd_verify)
