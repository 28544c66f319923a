"""PADing's steps of ``fastseg train`` / ``fastseg eval`` (dispatched from `fastseg.cli.train`):

* ``fastseg train mask2former_<backbone> --seen-only [--task panoptic|semantic]``: stage 1, the seen-only
  Mask2Former (panoptic: images with an unseen class are never drawn; semantic: unseen pixels ignored); its
  checkpoints carry the protocol in their metadata;
* ``fastseg train pading_<backbone> --stage1 CKPT``: stage 2 from that checkpoint (refused before any step when it is
  not a seen-only Mask2Former of the same split), two optimiser steps per iteration (`train_stage2`);
* ``fastseg eval pading_<backbone> --checkpoint CKPT``: mIoU, PQ / SQ / RQ and mask AP50 over seen, unseen and
  their harmonic mean.

The world is the CLI's (``--world zero-shot``: unseen snow, ellipse, diamond; default: unseen ellipse, diamond).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import model_kwargs, parse_device, shapes_world, train_config

__all__ = ["add_pading_train_args", "cmd_eval_pading", "cmd_train_pading", "cmd_train_seen_only", "is_pading"]


def is_pading(model_name: str) -> bool:
    return model_name.startswith("pading_")


def add_pading_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seen-only",
        action="store_true",
        help="PADing stage 1: train a mask2former_* on seen classes only (the zero-shot protocol)",
    )
    p.add_argument(
        "--stage1", metavar="CKPT", help="pading_*: the seen-only Mask2Former checkpoint stage 2 starts from"
    )
    p.add_argument("--classifier-lr", type=float, default=1e-3, help="pading_*: SGD lr of new_fc (official 1e-3)")


def cmd_train_seen_only(args: argparse.Namespace) -> int:
    from ..data.shapes import ShapesDataset
    from ..engine import train
    from ..engine.recipes.pading import seen_only_dataset, seen_only_segmenter

    world = shapes_world(args)
    task = getattr(args, "task", None) or "panoptic"
    model = seen_only_segmenter(args.model, world, task, **model_kwargs(args.model_arg))
    model.model_name = args.model
    train_set = seen_only_dataset(world, task, length=args.train_length, seed=args.seed)
    out_dir = Path(args.out or f"runs/{args.model}_seen_only")
    cfg = train_config(args, out_dir)
    # Validation on seen classes only, as the model was trained (the zero-shot numbers come from stage 2's eval).
    val_set = ShapesDataset("val", length=args.val_length, config=world, seed=args.seed, unseen="ignore")
    result = train(model, train_set, cfg, val_set=val_set, resume=args.resume)
    metrics = getattr(result, "final_metrics", None) or {}
    if metrics:
        print(f"val mIoU (seen classes) {metrics['mIoU']:.4f}")
    print(f"seen-only stage 1 ({task}; unseen: {', '.join(world.unseen_classes)}): {out_dir / 'model.safetensors'}")
    print(
        f"next: fastseg train pading_{args.model.removeprefix('mask2former_')} --stage1 "
        f"{out_dir / 'model.safetensors'}" + (" --world zero-shot" if getattr(args, "world", "") == "zero-shot" else "")
    )
    return 0


def _pading_model(args: argparse.Namespace, world, checkpoint: str | None = None):
    from ..registry import create_model

    kwargs = model_kwargs(args.model_arg)
    if getattr(args, "task", None):
        kwargs.setdefault("task", args.task)
    return create_model(args.model, num_classes=world.num_classes, checkpoint_path=checkpoint, **kwargs)


def cmd_train_pading(args: argparse.Namespace) -> int:
    from ..engine.recipes.pading import Stage2Config, seen_only_dataset, train_stage2

    if not args.stage1:
        raise ValueError(
            f"{args.model} is PADing's stage 2: give the seen-only Mask2Former with --stage1 CKPT "
            f"(train it with `fastseg train mask2former_<backbone> --seen-only`)"
        )
    if args.resume:
        raise ValueError("--resume is not supported by PADing's stage 2; start it again from --stage1")
    world = shapes_world(args)
    model = _pading_model(args, world)
    model.load_stage1(args.stage1)  # every check happens here, before any step
    out_dir = Path(args.out or f"runs/{args.model}")
    cfg = Stage2Config(
        steps=args.steps,
        batch_size=args.batch_size,
        generator_lr=args.lr,
        classifier_lr=args.classifier_lr,
        warmup_steps=min(args.warmup_steps, args.steps),
        seed=args.seed,
        device=str(parse_device(args.device)),
        out_dir=str(out_dir),
        num_workers=args.workers,
    )
    data = seen_only_dataset(
        world, "semantic" if model.task == "semantic" else "panoptic", length=args.train_length, seed=args.seed
    )
    result = train_stage2(model, data, cfg, metadata={"stage1_checkpoint": str(args.stage1)})
    last = result.history[-1] if result.history else {}
    print(
        f"stage 2: {result.steps} iterations in {result.seconds:.0f} s; last losses "
        + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in ("step", "generator_lr"))
    )
    print(f"weights: {result.weights}   log: {out_dir / 'metrics.jsonl'}")
    return 0


def cmd_eval_pading(args: argparse.Namespace) -> int:
    from ..data.shapes import ShapesDataset
    from ..engine.recipes.pading import TASKS, evaluate_zero_shot, format_zero_shot

    world = shapes_world(args)
    model = _pading_model(args, world, args.checkpoint)
    tasks = [t for t in (args.task or ",".join(TASKS)).split(",") if t]
    dataset = ShapesDataset(args.split or "val", length=args.length, config=world, seed=args.seed)
    metrics = evaluate_zero_shot(
        model, dataset, tasks=tasks, batch_size=args.batch_size, device=str(parse_device(args.device))
    )
    names = model.pretrained_cfg.class_names
    print(
        f"zero-shot split: seen {[names[c] for c in model.seen_classes]}, unseen {[names[c] for c in model.unseen_classes]}"
    )
    print(format_zero_shot(metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2, default=float))
    return 0
