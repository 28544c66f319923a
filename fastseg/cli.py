"""The `fastseg` command: list, train, eval, predict, shapes, bench (export and verify come from fastseg.export).

Every sub-command works offline on the built-in shapes world by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .export.cli import add_export_commands, parse_size
from .gss_cli import add_gss_commands

__all__ = ["main", "build_parser"]


def _model_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``["impl=torch", "fpn_channels=64"]`` -> kwargs, values parsed as JSON when they parse."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--model-arg expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible")
    return torch.device(name)


def _world(args: argparse.Namespace):
    from .data.shapes import ShapesConfig

    return ShapesConfig(image_size=args.image_size)


# ----------------------------------------------------------------------------------------------------------- list
def cmd_list(args: argparse.Namespace) -> int:
    from .registry import list_models

    names = list_models(args.pattern or "")
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


# ---------------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .data.shapes import ShapesDataset
    from .engine import TrainConfig, train
    from .registry import create_model

    world = _world(args)
    loss_fn = None
    if args.labelled_fraction < 1.0:
        # Semi-supervised recipe (UniMatch / S4MIM: labelled + unlabelled pairs and their loss); any other model
        # trains supervised on the labelled subset alone.
        from .models.s4mim import build_training

        model, train_set, loss_fn = build_training(
            args.model, world=world, labelled_fraction=args.labelled_fraction, seed=args.seed,
            train_length=args.train_length, **_model_kwargs(args.model_arg),
        )
    else:
        model = create_model(args.model, num_classes=world.num_classes, **_model_kwargs(args.model_arg))
        train_set = ShapesDataset("train", length=args.train_length, config=world, seed=args.seed)
    out_dir = Path(args.out or f"runs/{args.model}")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        optimizer=args.optimizer, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
        save_every=args.save_every, out_dir=str(out_dir), seed=args.seed, device=args.device,
        num_workers=args.workers, grad_clip=args.grad_clip, amp=args.amp,
    )
    val_set = ShapesDataset("val", length=args.val_length, config=world, seed=args.seed)
    result = train(model, train_set, cfg, val_set=val_set, resume=args.resume, loss_fn=loss_fn)
    metrics = getattr(result, "final_metrics", None) or {}
    if metrics:
        print(f"val mIoU {metrics['mIoU']:.4f}  mAcc {metrics['mAcc']:.4f}  aAcc {metrics['aAcc']:.4f}")
    print(f"weights: {out_dir / 'model.safetensors'}   log: {out_dir / 'metrics.jsonl'}")
    return 0


# ----------------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from .data.shapes import ShapesDataset
    from .engine import evaluate
    from .registry import create_model

    world = _world(args)
    model = create_model(args.model, num_classes=world.num_classes, checkpoint_path=args.checkpoint,
                         **_model_kwargs(args.model_arg))
    dataset = ShapesDataset(args.split, length=args.length, config=world, seed=args.seed)
    metrics = evaluate(model, dataset, batch_size=args.batch_size, device=_device(args.device))
    print(metrics.get("table", ""))
    print(f"mIoU {metrics['mIoU']:.4f}  mAcc {metrics['mAcc']:.4f}  aAcc {metrics['aAcc']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in metrics.items() if k != "table"}, indent=2,
                                              default=float))
    return 0


# -------------------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .data.visualize import overlay
    from .registry import create_model

    model = create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint,
                         **_model_kwargs(args.model_arg)).eval()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise SystemExit(f"cannot read image {path}: {err}") from None
        x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std
        pred = model.predict(x[None])[0].numpy()
        target = out_dir / (Path(path).stem + "_pred.png")
        Image.fromarray(overlay(rgb, pred, np.asarray(cfg.palette, dtype=np.uint8), alpha=args.alpha)).save(target)
        print(f"{path} -> {target}")
    return 0


# --------------------------------------------------------------------------------------------------------- shapes
def cmd_shapes(args: argparse.Namespace) -> int:
    from .data.shapes import ShapesDataset
    from .data.visualize import render_grid

    dataset = ShapesDataset(args.split, length=max(args.n, 1), config=_world(args), seed=args.seed)
    render_grid(dataset, n=args.n, columns=args.columns, path=args.out)
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench.core import kernel_families
    from .bench.runner import environment, format_table, run_kernels, run_models, run_stages, save_json, save_plot
    from .registry import list_models

    if args.static:  # compile reports for NVIDIA targets + traffic model; no timing, no GPU needed
        from .bench.static import problems, run_static

        report = run_static(full=args.full)
        return 1 if any(problems(r) for r in report["rows"] if r["shipped"]) else 0
    device = _device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    env = environment(device)
    print(f"fastseg bench on {env['device']} ({device.type}); torch {env['torch']}, triton {env.get('triton')}")
    if device.type != "cuda":
        print("note: no CUDA GPU here, so the Triton providers are not timed (they need a GPU); CPU providers run.")
    rows = []
    families = None if args.kernels == "all" else [f for f in args.kernels.split(",") if f and f != "none"]
    if args.kernels != "none" and (families is None or families):
        rows += run_kernels(device, families or kernel_families(), quick=not args.full, rounds=args.rounds)
    if args.models != "none":
        models = list_models(args.models.split(",")) if args.models != "default" else args.default_models
        if not models:
            raise SystemExit(f"--models {args.models!r} matches no registered model")
        providers = args.providers.split(",")
        rows += run_models(device, models, size=args.size, batch=args.batch, dtype=dtype, providers=providers,
                           rounds=args.rounds)
        if args.stages:
            rows += run_stages(device, models, size=args.size, batch=args.batch, rounds=args.rounds)
    print(format_table(rows, env))
    arguments = {k: v for k, v in vars(args).items() if k != "func"}
    if args.json:
        save_json(rows, env, args.json, arguments)
        print(f"JSON: {args.json}")
    if args.plot:
        try:
            save_plot(rows, env, args.plot)
            print(f"plot: {args.plot}")
        except ValueError as err:
            print(f"no plot: {err}", file=sys.stderr)
    if device.type != "cuda" and args.static_after:
        # Without a GPU, show what the kernels would do on one: the static report (cached compiles) after the timings.
        from .bench.static import run_static

        print()
        run_static(full=False, out=None, table_targets=("sm_87", "sm_90"))
    return 0 if any(r.ok for r in rows) else 1


# --------------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastseg", description="Fused-kernel semantic segmentation: train, evaluate, predict, benchmark, export."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered models (shell-style pattern, e.g. 'ecenet*')")
    p.add_argument("pattern", nargs="?", default="")
    p.set_defaults(func=cmd_list)

    def world_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--image-size", type=parse_size, default=(64, 64), metavar="H[,W]", help="shapes-world image size")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra model option (repeatable)")

    p = sub.add_parser("train", help="train a model on the built-in shapes world")
    p.add_argument("model")
    world_args(p)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none", help="autocast (CUDA only)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--train-length", type=int, default=10**6, help="size of the (procedural) training set")
    p.add_argument("--val-length", type=int, default=256)
    p.add_argument("--labelled-fraction", type=float, default=1.0,
                   help="labelled share of the training split (< 1: semi-supervised recipe for unimatch_* / s4mim_*)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output directory (default runs/MODEL)")
    p.add_argument("--resume", help="resume from a run directory or state file ('auto': the output directory)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the shapes world (mIoU, mAcc, aAcc, per-class IoU)")
    p.add_argument("model")
    p.add_argument("--checkpoint", required=True)
    world_args(p)
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict class maps for images and write colour overlays as PNG")
    p.add_argument("model")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/predict")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("shapes", help="render a grid of shapes-world images with their masks")
    world_args(p)
    p.add_argument("--out", default="shapes.png")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.set_defaults(func=cmd_shapes)

    p = sub.add_parser("bench", help="benchmark kernels and models on this device; table, JSON, plot")
    p.add_argument("--kernels", default="all", help="kernel families, comma-separated, 'all' or 'none'")
    p.add_argument("--models", default="default",
                   help="model name patterns, comma-separated ('default': a small set; 'none' to skip)")
    p.add_argument("--providers", default="eager,fused,compile,onnxruntime", help="model providers")
    p.add_argument("--size", type=parse_size, default=(256, 256), metavar="H[,W]", help="model input size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="model precision (autocast)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per case (after warm-up)")
    p.add_argument("--full", action="store_true", help="all kernel shapes, not only the quick set")
    p.add_argument("--stages", action="store_true",
                   help="also time each inference stage, reference vs fused (models with stages, e.g. gss_*)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write rows and environment as JSON")
    p.add_argument("--plot", help="write a PNG plot (matplotlib)")
    p.add_argument("--static", action="store_true",
                   help="only the static GPU report: every Triton kernel compiled for sm_80/86/87/89/90 (registers, "
                        "spills, shared memory, tensor cores, occupancy) and the traffic model; no GPU needed")
    p.add_argument("--no-static", dest="static_after", action="store_false",
                   help="on a CPU-only machine, do not print the static report after the timings")
    p.set_defaults(func=cmd_bench, default_models=["fpn_resnet18", "ecenet_resnet18"])

    add_export_commands(sub)  # export, verify
    add_gss_commands(sub)  # gss roundtrip | fit-tokenizer | convert-dalle
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"fastseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
