"""``fastseg list | train | eval | predict | shapes``: models on the built-in shapes world.

Every command works offline on the built-in shapes world by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import add_world_args, model_kwargs, parse_device, parse_size, shapes_world, train_config
from .data import add_data_args, adopt_dataset_cfg, build_real_training, dataset_fields, is_real, open_dataset
from .pading import add_pading_train_args, cmd_eval_pading, cmd_train_pading, cmd_train_seen_only, is_pading

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


def _apply_world(model, world) -> None:
    """Give the model the world's class names, palette and thing / stuff split (a non-default world, e.g.
    zero-shot, has other classes than the default the model was built with)."""
    from ..data.shapes import ShapesConfig, pretrained_cfg_fields
    from ..registry import PretrainedCfg

    cfg = getattr(model, "pretrained_cfg", None)
    if world == ShapesConfig(image_size=world.image_size) or not isinstance(cfg, PretrainedCfg):
        return
    fields = {**cfg.to_dict(), **pretrained_cfg_fields(world)}
    fields["input_size"] = cfg.input_size
    model.pretrained_cfg = PretrainedCfg.from_dict(fields)


def _universal_task_kwargs(model_name: str, task: str | None) -> dict[str, Any]:
    """Model options for ``--task`` at training time (universal models, e.g. mask2former_*, train on instance
    segments for "panoptic" and on one segment per class for "semantic"; other models are semantic only)."""
    if task is None:
        return {}
    if model_name.startswith("mask2former"):
        return {"train_task": task}
    if task != "semantic":
        raise ValueError(
            f"--task {task}: {model_name} is a semantic segmentation model; panoptic and instance "
            "tasks need a universal model (mask2former_*)"
        )
    return {}


# ---------------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from ..data.shapes import ShapesDataset
    from ..registry import create_model

    if args.seen_only or is_pading(args.model):  # PADing's stage 1 / stage 2
        return cmd_train_seen_only(args) if args.seen_only else cmd_train_pading(args)
    if is_real(args):
        kwargs = {**_universal_task_kwargs(args.model, args.task), **model_kwargs(args.model_arg)}
        model, train_set, val_set, loss_fn = build_real_training(args, kwargs)
        return _run_training(args, model, train_set, val_set, loss_fn)
    world = shapes_world(args)
    loss_fn = None
    if args.pseudo_masks:
        # Final segmenter of weakly supervised methods (SemPLeS): pseudo-mask PNGs as labels, checked before training;
        # validation on the val split's ground truth in the same (WSSS) label space.
        from ..data.pseudo import PseudoMaskDataset
        from ..data.weak import WeakShapes

        if args.labelled_fraction < 1.0:
            raise ValueError("--pseudo-masks and --labelled-fraction cannot be combined")
        train_set = PseudoMaskDataset(args.pseudo_masks)
        kwargs = model_kwargs(args.model_arg)
        if train_set.class_names:
            kwargs.setdefault("class_names", train_set.class_names)
        try:
            model = create_model(args.model, num_classes=train_set.num_classes, **kwargs)
        except TypeError:  # models without a class_names option
            kwargs.pop("class_names", None)
            model = create_model(args.model, num_classes=train_set.num_classes, **kwargs)
        val_set = WeakShapes("val", length=args.val_length, seed=args.seed, with_masks=True)
        return _run_training(args, model, train_set, val_set, loss_fn)
    if args.labelled_fraction < 1.0:
        # Semi-supervised recipe (UniMatch / S4MIM: labelled + unlabelled pairs and their loss); any other model
        # trains supervised on the labelled subset alone.
        from ..engine.recipes.semi import build_training

        model, train_set, loss_fn = build_training(
            args.model,
            world=world,
            labelled_fraction=args.labelled_fraction,
            seed=args.seed,
            train_length=args.train_length,
            **model_kwargs(args.model_arg),
        )
    else:
        kwargs = {**_universal_task_kwargs(args.model, args.task), **model_kwargs(args.model_arg)}
        model = create_model(args.model, num_classes=world.num_classes, **kwargs)
        _apply_world(model, world)
        train_set = ShapesDataset("train", length=args.train_length, config=world, seed=args.seed)
    val_set = ShapesDataset("val", length=args.val_length, config=world, seed=args.seed)
    return _run_training(args, model, train_set, val_set, loss_fn)


def _run_training(args: argparse.Namespace, model, train_set, val_set, loss_fn) -> int:
    from ..engine import train

    out_dir = Path(args.out or f"runs/{args.model}")
    cfg = train_config(args, out_dir)
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

    if is_pading(args.model):  # seen / unseen / harmonic mIoU, PQ and AP50
        return cmd_eval_pading(args)
    tasks = [t for t in (args.task or "semantic").split(",") if t]
    unknown = [t for t in tasks if t not in ("semantic", "panoptic", "instance")]
    if unknown or not tasks:
        raise ValueError(f"--task takes semantic, panoptic and / or instance (comma-separated), got {args.task!r}")
    if any(t != "semantic" for t in tasks) and not args.model.startswith("mask2former"):
        _universal_task_kwargs(args.model, "panoptic")  # raises the clear error
    universal = [t for t in tasks if t != "semantic"]
    if is_real(args):
        # Panoptic / instance scoring reads the "panoptic" map (COCO readers), one image at a time (sizes differ).
        options = {"panoptic": True} if universal else {}
        dataset = open_dataset(args, args.split or "val", transform=None, **options)
        model = create_model(
            args.model, num_classes=dataset.num_classes, checkpoint_path=args.checkpoint, **model_kwargs(args.model_arg)
        )
        adopt_dataset_cfg(model, dataset.pretrained_cfg_fields())
        protocol = None if args.mode == "default" else args.mode
        subsets = {"seen": dataset.seen_classes, "unseen": dataset.unseen_classes}
        universal_batch = 1
    else:
        if args.split not in (None, "val", "test"):
            raise SystemExit(f"--split {args.split}: the shapes world has the splits val and test")
        if args.mode != "default":
            raise SystemExit("--mode applies to real datasets (--data NAME); the shapes world is scored whole")
        world = shapes_world(args)
        model = create_model(
            args.model, num_classes=world.num_classes, checkpoint_path=args.checkpoint, **model_kwargs(args.model_arg)
        )
        _apply_world(model, world)
        dataset = ShapesDataset(args.split or "val", length=args.length, config=world, seed=args.seed)
        protocol = None
        subsets = {"seen": world.seen_ids, "unseen": world.unseen_ids}
        universal_batch = args.batch_size
    report: dict[str, Any] = {}
    if "semantic" in tasks:
        metrics = evaluate(
            model, dataset, batch_size=args.batch_size, device=parse_device(args.device), protocol=protocol
        )
        print(metrics.get("table", ""))
        print(f"mIoU {metrics['mIoU']:.4f}  mAcc {metrics['mAcc']:.4f}  aAcc {metrics['aAcc']:.4f}")
        if "hIoU" in metrics:  # zero-shot: --data-arg unseen=...
            print(
                f"mIoU seen {metrics['mIoU_seen']:.4f}  unseen {metrics['mIoU_unseen']:.4f}  "
                f"harmonic {metrics['hIoU']:.4f}"
            )
        report["semantic"] = {k: v for k, v in metrics.items() if k != "table"}
    if universal:
        from ..engine.evaluate_universal import evaluate_universal

        model.to(parse_device(args.device))
        out = evaluate_universal(model, dataset, universal, batch_size=universal_batch, subsets=subsets)
        if "panoptic" in out:
            pq = out["panoptic"]
            print(pq.pop("table"))
            print(
                f"PQ {100 * pq['PQ']:.2f}  SQ {100 * pq['SQ']:.2f}  RQ {100 * pq['RQ']:.2f}  "
                f"(things PQ {100 * pq['things']['PQ']:.2f}, stuff PQ {100 * pq['stuff']['PQ']:.2f}; "
                f"seen PQ {100 * pq['seen']['PQ']:.2f}, unseen PQ {100 * pq['unseen']['PQ']:.2f})"
            )
            report["panoptic"] = pq
        if "instance" in out:
            ap = out["instance"]
            names = model.pretrained_cfg.class_names
            for c, r in ap["per_class"].items():
                print(
                    f"{names[c]:<10} AP {100 * r['AP']:6.2f}  AP50 {100 * r['AP50']:6.2f}  AP75 {100 * r['AP75']:6.2f}"
                )
            print(f"mask AP {100 * ap['AP']:.2f}  AP50 {100 * ap['AP50']:.2f}  AP75 {100 * ap['AP75']:.2f}")
            report["instance"] = ap
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                report if len(report) > 1 or "semantic" not in report else report["semantic"], indent=2, default=float
            )
        )
    return 0


# -------------------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ..data.visualize import overlay
    from ..engine.inference import predict_image
    from ..registry import create_model

    if args.task == "panoptic" and not args.model.startswith("mask2former"):
        _universal_task_kwargs(args.model, "panoptic")  # raises the clear error
    protocol = None
    if is_real(args):
        from ..data.datasets import dataset_class

        fields = dataset_fields(args)
        model = create_model(
            args.model,
            num_classes=fields["num_classes"],
            checkpoint_path=args.checkpoint,
            **model_kwargs(args.model_arg),
        )
        adopt_dataset_cfg(model, fields).eval()
        protocol = dataset_class(args.data).eval_protocol  # the dataset's test-time resize / sliding window
    else:
        model = create_model(
            args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint, **model_kwargs(args.model_arg)
        ).eval()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        try:
            with Image.open(path) as img:
                rgb = np.array(img.convert("RGB"))  # writable, for torch.from_numpy
        except (OSError, ValueError) as err:
            raise SystemExit(f"cannot read image {path}: {err}") from None
        x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std
        target = out_dir / (Path(path).stem + "_pred.png")
        if args.task == "panoptic":
            from ..data.visualize import overlay_panoptic

            pan = model.predict(x[None], task="panoptic")[0].numpy()
            image = overlay_panoptic(
                rgb, pan, np.asarray(cfg.palette, dtype=np.uint8), getattr(cfg, "label_divisor", 1000), alpha=args.alpha
            )
        else:
            pred = model.predict(x[None]) if protocol is None else predict_image(model, x[None], protocol)
            image = overlay(rgb, pred[0].numpy(), np.asarray(cfg.palette, dtype=np.uint8), alpha=args.alpha)
        Image.fromarray(image).save(target)
        print(f"{path} -> {target}")
    return 0


# --------------------------------------------------------------------------------------------------------- shapes
def cmd_shapes(args: argparse.Namespace) -> int:
    from ..data.shapes import ShapesDataset
    from ..data.visualize import render_grid

    dataset = ShapesDataset(args.split, length=max(args.n, 1), config=shapes_world(args), seed=args.seed)
    if args.format == "grid":
        render_grid(dataset, n=args.n, columns=args.columns, path=args.out)
        print(f"wrote {args.out}")
        return 0
    from ..data.coco import write_coco_instances, write_coco_panoptic

    writer = write_coco_panoptic if args.format == "coco-panoptic" else write_coco_instances
    path = writer(dataset, args.out, n=args.n, overwrite=args.overwrite)
    print(f"wrote {path} ({args.n} {args.split} images under {Path(args.out) / 'images' / args.split})")
    return 0


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``list``, ``train``, ``eval``, ``predict`` and ``shapes`` to the ``fastseg`` command's sub-parsers."""
    p = sub.add_parser("list", help="list registered models (shell-style pattern, e.g. 'ecenet*')")
    p.add_argument("pattern", nargs="?", default="")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train a model on the built-in shapes world or a dataset on disk (--data)")
    p.add_argument("model")
    add_world_args(p)
    add_data_args(p)
    p.add_argument("--crop", type=parse_size, metavar="H[,W]", help="training crop of --data (default: the dataset's)")
    p.add_argument("--train-split", default="train", help="training split of --data (e.g. train_aug for VOC)")
    p.add_argument("--val-split", default="val", help="evaluation split of --data ('none' to skip)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--task",
        choices=["semantic", "panoptic"],
        default=None,
        help="universal models (mask2former_*): train on instance segments (panoptic, their default) or "
        "one segment per class (semantic)",
    )
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
    p.add_argument(
        "--labelled-fraction",
        type=float,
        default=1.0,
        help="labelled share of the training split (< 1: semi-supervised recipe for unimatch_* / s4mim_*)",
    )
    p.add_argument(
        "--pseudo-masks",
        metavar="DIR",
        help="train on pseudo-mask PNGs (from `fastseg semples pseudo-masks`) instead of ground truth",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output directory (default runs/MODEL)")
    p.add_argument("--resume", help="resume from a run directory or state file ('auto': the output directory)")
    add_pading_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the shapes world or --data (mIoU, mAcc, per-class IoU)")
    p.add_argument("model")
    p.add_argument("--checkpoint", required=True)
    add_world_args(p)
    add_data_args(p)
    p.add_argument("--split", help="split to score (default val)")
    p.add_argument(
        "--mode",
        choices=["default", "whole", "slide", "ms_flip"],
        default="default",
        help="--data test protocol: the dataset's own (default), whole image, sliding window, or "
        "multi-scale (0.5-1.75) + flip (semantic task)",
    )
    p.add_argument(
        "--task",
        default=None,
        help="semantic (mIoU), panoptic (PQ / SQ / RQ), instance (mask AP); comma-separated for several "
        "(default: semantic; for pading_* all three, over seen / unseen / harmonic mean)",
    )
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
    add_data_args(p)
    p.add_argument("--out", default="runs/predict")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    p.add_argument(
        "--task",
        choices=["semantic", "panoptic"],
        default="semantic",
        help="panoptic: overlay segments with instance-distinct colours (mask2former_*)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("shapes", help="render a grid of shapes-world images, or write a split as COCO files")
    add_world_args(p)
    p.add_argument(
        "--format",
        choices=["grid", "coco-panoptic", "coco-instances"],
        default="grid",
        help="grid: one PNG; coco-panoptic: PNG + JSON under --out; coco-instances: JSON with RLE masks",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing COCO JSON files")
    p.add_argument("--out", default="shapes.png", help="grid PNG path, or the output folder of a COCO format")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.set_defaults(func=cmd_shapes)
