"""``fastseg clip ...`` and ``fastseg semples ...`` (wired into `fastseg.cli.main` by ``add_semples_commands``).

* ``fastseg clip train --out DIR``: train the shapes-tiny CLIP on the world's captions; prints retrieval accuracy.
* ``fastseg clip eval --clip-checkpoint F``: image-text retrieval accuracy of a CLIP on the world's val split.
* ``fastseg semples weaktr --out DIR``: WeakTr phase 1 (the CAM generator every run starts from).
* ``fastseg semples match --weaktr F --clip-checkpoint F --out DIR``: run (a), segment-label matching.
* ``fastseg semples prompts --stage-a F --clip-checkpoint F --out DIR``: run (b), contrastive prompt learning.
* ``fastseg semples refine --weaktr F --prompts F --clip-checkpoint F --out DIR``: run (c), prompt-guided refinement.
* ``fastseg semples evaluate --cam F``: pseudo-mask mIoU on train ground truth, fixed and swept threshold.
* ``fastseg semples pseudo-masks --cam F --out DIR``: label PNGs for ``fastseg train MODEL --pseudo-masks DIR``.

Every training command resumes from its output folder's last checkpoint by default (``--resume auto``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.recipes.semples import RunOptions

__all__ = ["add_semples_commands"]


def _clip(args: argparse.Namespace):
    from ..models.clip import build_clip

    return build_clip(args.clip_config, args.clip_checkpoint, require_checkpoint=True)


def _common(p: argparse.ArgumentParser, steps: int, batch: int) -> None:
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, run.json)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--lr", type=float, help="learning rate (default: the spec's base lr x batch / 512)")
    p.add_argument("--seed", type=int, default=504)
    p.add_argument("--train-length", type=int, default=4096)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--resume", default="auto", help="'auto' (the --out folder's last checkpoint), a file, or 'none'")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="weaktr_shapes_tiny", help="WeakTr variant (registry name)")


def _clip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip-config", default="shapes-tiny-clip", help="open_clip architecture (e.g. ViT-B-32)")
    p.add_argument("--clip-checkpoint", help="local CLIP weights (required; nothing is downloaded)")
    p.add_argument("--lambda-b", type=float, default=2.4)
    p.add_argument("--lambda-p", type=float, default=0.02)
    p.add_argument("--lambda-r", type=float, default=0.05)


def _resume(args: argparse.Namespace):
    return None if args.resume in (None, "none") else args.resume


def _train_kwargs(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_length": args.train_length,
        "save_every": args.save_every,
        "resume": _resume(args),
        "device": args.device,
        "model_name": args.model,
    }


def _run_options(args: argparse.Namespace) -> RunOptions:
    """The options of SemPLeS runs (a), (b), (c): the training flags and the lambda flags."""
    from ..engine.recipes.semples import RunOptions

    return RunOptions(**_train_kwargs(args), lambda_b=args.lambda_b, lambda_p=args.lambda_p, lambda_r=args.lambda_r)


def _done(out: str) -> int:
    print(f"weights: {Path(out) / 'model.safetensors'}   log: {Path(out) / 'metrics.jsonl'}")
    return 0


def cmd_clip_train(args: argparse.Namespace) -> int:
    from ..engine.recipes.clip import train_clip

    _, metrics = train_clip(
        args.out,
        args.clip_config,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        train_length=args.train_length,
        save_every=args.save_every,
        resume=_resume(args),
        device=args.device,
    )
    print(json.dumps(metrics, indent=2))
    return _done(args.out)


def cmd_clip_eval(args: argparse.Namespace) -> int:
    from ..engine.recipes.clip import CaptionedShapes, clip_retrieval_accuracy

    print(json.dumps(clip_retrieval_accuracy(_clip(args), CaptionedShapes("val", length=args.length)), indent=2))
    return 0


def cmd_weaktr(args: argparse.Namespace) -> int:
    from ..engine.recipes.semples import train_weaktr

    kw = _train_kwargs(args)
    train_weaktr(args.out, backbone_checkpoint=args.backbone_checkpoint, **kw)
    return _done(args.out)


def cmd_match(args: argparse.Namespace) -> int:
    from ..engine.recipes.semples import run_segment_label_matching

    run_segment_label_matching(args.weaktr, _clip(args), args.out, _run_options(args))
    return _done(args.out)


def cmd_prompts(args: argparse.Namespace) -> int:
    from ..engine.recipes.semples import run_prompt_learning

    run_prompt_learning(args.stage_a, _clip(args), args.out, _run_options(args))
    return _done(args.out)


def cmd_refine(args: argparse.Namespace) -> int:
    from ..engine.recipes.semples import run_prompt_refinement

    run_prompt_refinement(args.weaktr, args.prompts, _clip(args), args.out, _run_options(args))
    return _done(args.out)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..data.weak import WeakShapes
    from ..engine.recipes.semples import evaluate_cams, load_cam_model, sweep_threshold

    model = load_cam_model(args.cam, args.model)
    data = WeakShapes("train", length=args.length, seed=args.data_seed, with_masks=True)
    fixed = evaluate_cams(model, data, [args.threshold])[args.threshold]
    swept = sweep_threshold(model, data)
    out = {
        "fixed_threshold": args.threshold,
        "fixed_mIoU": fixed["mIoU"],
        "fixed_IoU": fixed["IoU"],
        "swept_threshold": swept["threshold"],
        "swept_mIoU": swept["metrics"]["mIoU"],
        "swept_IoU": swept["metrics"]["IoU"],
        "curve": swept["curve"],
        "class_names": list(data.class_names),
        "note": "the swept threshold is chosen on train ground truth (official protocol); the fixed one is not",
    }
    print(
        f"pseudo-mask mIoU: fixed t={args.threshold}: {fixed['mIoU']:.4f}   swept on train GT: "
        f"t={swept['threshold']}: {swept['metrics']['mIoU']:.4f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def cmd_pseudo_masks(args: argparse.Namespace) -> int:
    from ..engine.recipes.semples import load_cam_model, write_pseudo_masks

    model = load_cam_model(args.cam, args.model)
    out = write_pseudo_masks(
        model,
        args.out,
        length=args.length,
        seed=args.data_seed,
        threshold=args.threshold,
        crf=args.crf,
        device=args.device if args.device != "auto" else "cpu",
    )
    print(f"pseudo masks: {out}  (train a segmenter: fastseg train MODEL --pseudo-masks {out})")
    return 0


def add_semples_commands(sub: argparse._SubParsersAction) -> None:
    from ..models.weaktr import DEFAULT_BACKGROUND_THRESHOLD

    clip = sub.add_parser("clip", help="CLIP on the shapes world: train (contrastive, captions) / eval (retrieval)")
    clip_sub = clip.add_subparsers(dest="clip_command", required=True, metavar="CLIP_COMMAND")
    p = clip_sub.add_parser("train", help="train a small CLIP on the world's captions")
    p.add_argument("--out", required=True)
    p.add_argument("--clip-config", default="shapes-tiny-clip")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-length", type=int, default=4096)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--resume", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_clip_train)
    p = clip_sub.add_parser("eval", help="image-text retrieval accuracy on the world's val split")
    p.add_argument("--clip-config", default="shapes-tiny-clip")
    p.add_argument("--clip-checkpoint", required=True)
    p.add_argument("--length", type=int, default=256)
    p.set_defaults(func=cmd_clip_eval)

    semples = sub.add_parser("semples", help="SemPLeS: WeakTr, runs (a) match / (b) prompts / (c) refine, pseudo masks")
    s_sub = semples.add_subparsers(dest="semples_command", required=True, metavar="SEMPLES_COMMAND")
    p = s_sub.add_parser("weaktr", help="WeakTr phase 1 (image-level labels)")
    _common(p, 600, 32)
    p.add_argument(
        "--backbone-checkpoint",
        help="local DeiT / timm checkpoint for the ViT, or an open_clip checkpoint whose image tower fits the model "
        "(weaktr_shapes_clip + the output of fastseg clip train)",
    )
    p.set_defaults(func=cmd_weaktr)
    p = s_sub.add_parser("match", help="run (a): segment-label matching (CAM head + AAF)")
    _common(p, 300, 32)
    _clip_args(p)
    p.add_argument("--weaktr", required=True, help="WeakTr phase-1 weights")
    p.set_defaults(func=cmd_match)
    p = s_sub.add_parser("prompts", help="run (b): contrastive learning of the background prompts")
    _common(p, 300, 32)
    _clip_args(p)
    p.add_argument("--stage-a", required=True, help="weights of run (a)")
    p.set_defaults(func=cmd_prompts)
    p = s_sub.add_parser("refine", help="run (c): prompt-guided refinement from the WeakTr weights")
    _common(p, 300, 32)
    _clip_args(p)
    p.add_argument("--weaktr", required=True, help="WeakTr phase-1 weights (run (c) restarts from them)")
    p.add_argument("--prompts", required=True, help="weights of run (b) (the learned prompts)")
    p.set_defaults(func=cmd_refine)
    for name, func, help_text in (
        ("evaluate", cmd_evaluate, "pseudo-mask mIoU on train GT (fixed / swept t)"),
        ("pseudo-masks", cmd_pseudo_masks, "write label PNGs for a segmenter"),
    ):
        p = s_sub.add_parser(name, help=help_text)
        p.add_argument("--cam", required=True, help="weights of a WeakTr or of a SemPLeS run")
        p.add_argument("--model", default="weaktr_shapes_tiny")
        p.add_argument("--length", type=int, default=4096 if name == "pseudo-masks" else 512)
        p.add_argument("--data-seed", type=int, default=0)
        p.add_argument("--threshold", type=float, default=DEFAULT_BACKGROUND_THRESHOLD)
        p.add_argument("--device", default="auto")
        if name == "evaluate":
            p.add_argument("--json", help="also write the result as JSON")
        else:
            p.add_argument("--out", required=True, help="new folder for the PNGs and meta.json")
            p.add_argument(
                "--crf",
                choices=["auto", "on", "off"],
                default="auto",
                help="dense CRF: 'auto' uses it when pydensecrf is importable (and says so otherwise)",
            )
        p.set_defaults(func=func)
