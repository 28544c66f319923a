"""``fastseg list | train | eval | predict | shapes``: models on the built-in shapes world.

Every command works offline on the built-in shapes world by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_world_args, model_kwargs, parse_device, shapes_world

__all__ = ["add_train_commands", "cmd_eval", "cmd_list", "cmd_predict", "cmd_shapes", "cmd_train"]


# ----------------------------------------------------------------------------------------------------------- list
def cmd_list(args: argparse.Namespace) -> int:
    from ..registry import list_models, model_tag

    names = list_models(args.pattern or "")
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    width = max(len(n) for n in names)
    for name in names:
        tag, differs = model_tag(name)
        # a tagged variant shrinks its paper's configuration: say how (create_model takes NAME or NAME.TAG)
        print(f"{name:<{width}}  .{tag}: {differs}" if tag else name)
    return 0


# ---------------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from ..data.shapes import ShapesDataset
    from ..engine import TrainConfig, train
    from ..registry import create_model

    world = shapes_world(args)
    loss_fn = None
    if args.labelled_fraction < 1.0:
        # Semi-supervised recipe (UniMatch / S4MIM: labelled + unlabelled pairs and their loss); any other model
        # trains supervised on the labelled subset alone.
        from ..engine.recipes.semi import build_training

        model, train_set, loss_fn = build_training(
            args.model, world=world, labelled_fraction=args.labelled_fraction, seed=args.seed,
            train_length=args.train_length, **model_kwargs(args.model_arg),
        )
    else:
        model = create_model(args.model, num_classes=world.num_classes, **model_kwargs(args.model_arg))
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
    from ..data.shapes import ShapesDataset
    from ..engine import evaluate
    from ..registry import create_model

    world = shapes_world(args)
    model = create_model(args.model, num_classes=world.num_classes, checkpoint_path=args.checkpoint,
                         **model_kwargs(args.model_arg))
    dataset = ShapesDataset(args.split, length=args.length, config=world, seed=args.seed)
    metrics = evaluate(model, dataset, batch_size=args.batch_size, device=parse_device(args.device))
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

    from ..data.visualize import overlay
    from ..registry import create_model

    model = create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint,
                         **model_kwargs(args.model_arg)).eval()
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
    from ..data.shapes import ShapesDataset
    from ..data.visualize import render_grid

    dataset = ShapesDataset(args.split, length=max(args.n, 1), config=shapes_world(args), seed=args.seed)
    render_grid(dataset, n=args.n, columns=args.columns, path=args.out)
    print(f"wrote {args.out}")
    return 0


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``list``, ``train``, ``eval``, ``predict`` and ``shapes`` to the ``fastseg`` command's sub-parsers."""
    p = sub.add_parser("list", help="list registered models (shell-style pattern, e.g. 'ecenet*')")
    p.add_argument("pattern", nargs="?", default="")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train a model on the built-in shapes world")
    p.add_argument("model")
    add_world_args(p)
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
    add_world_args(p)
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
    add_world_args(p)
    p.add_argument("--out", default="shapes.png")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.set_defaults(func=cmd_shapes)
