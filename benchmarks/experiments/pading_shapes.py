"""PADing's claims on the shapes world's zero-shot split (unseen: snow, ellipse, diamond), 3 seeds, equal budget.

Per seed one seen-only Mask2Former (stage 1, panoptic protocol: images with an unseen class are never drawn) is
trained; every variant starts from that same checkpoint and gets the same stage-2 budget:

* ``seen_only``: the stage-1 classifier itself (no stage 2): claim (a), it should score ~0 on unseen classes;
* ``pading``: PADing, primitive generator + structure losses: claim (b), clearly above ``seen_only`` on unseen;
* ``gmmn``: the classic GMMN feature generator (MLP, noise concatenated to the input, no primitives), everything
  else equal: claim (c), PADing should beat it on harmonic PQ and mIoU;
* ``no_structure``: PADing with lambda_s = 0 (no disentanglement / relation / alignment losses): claim (d).

Metrics on the validation split with every class present: mIoU (semantic output), PQ / SQ / RQ (panoptic output),
mask AP50 (instance output, thing classes), each over seen, unseen and their harmonic mean.

The JSON is rewritten after every run (resumable with ``--resume``; stage-1 checkpoints are kept in ``--work-dir``
and reused), and ``--max-minutes`` stops starting new runs. Usage (what produced the README table)::

    python benchmarks/experiments/pading_shapes.py --seeds 0 1 2 --stage1-steps 300 --stage2-steps 200 \
        --batch-size 8 --val-length 96 --threads 1 --max-minutes 60
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fastseg
from fastseg.engine import TrainConfig, train
from fastseg.engine.recipes.pading import (
    Stage2Config,
    evaluate_zero_shot,
    seen_only_dataset,
    seen_only_segmenter,
    train_stage2,
)
from fastseg.experiments.render import render_pading_table

VARIANTS = {
    "seen_only": None,
    "pading": {},
    "gmmn": {"generator": "gmmn"},
    "no_structure": {"structure_weight": 0.0},
}
METRICS = (("semantic", "mIoU"), ("panoptic", "PQ"), ("panoptic", "SQ"), ("panoptic", "RQ"), ("instance", "AP50"))


def stage1(seed: int, args: argparse.Namespace, world) -> Path:
    path = Path(args.work_dir) / f"seed{seed}" / "stage1"
    if (path / "model.safetensors").exists():
        return path / "model.safetensors"
    torch.manual_seed(seed)
    seg = seen_only_segmenter("mask2former_resnet18", world, "panoptic")
    data = seen_only_dataset(world, "panoptic", length=10**6, seed=seed)
    cfg = TrainConfig(
        steps=args.stage1_steps,
        batch_size=args.batch_size,
        lr=args.stage1_lr,
        weight_decay=0.05,
        warmup_steps=20,
        grad_clip=1.0,
        seed=seed,
        out_dir=str(path),
        progress=False,
        device="cpu",
        log_every=20,
    )
    train(seg, data, cfg)
    return path / "model.safetensors"


def run_one(variant: str, seed: int, checkpoint: Path, args: argparse.Namespace, world) -> dict:
    torch.manual_seed(seed)
    kwargs = VARIANTS[variant]
    model = fastseg.create_model("pading_resnet18", **(kwargs or {}))
    model.load_stage1(checkpoint)
    start = time.perf_counter()
    info: dict = {}
    if kwargs is not None:
        cfg = Stage2Config(
            steps=args.stage2_steps,
            batch_size=args.batch_size,
            generator_lr=args.generator_lr,
            classifier_lr=args.classifier_lr,
            seed=seed,
            log_every=10,
        )
        result = train_stage2(model, seen_only_dataset(world, "panoptic", length=10**6, seed=seed), cfg)
        info = {"last_losses": result.history[-1], "skipped_generator_steps": result.skipped_generator_steps}
    train_s = time.perf_counter() - start
    from fastseg.data.shapes import ShapesDataset

    val = ShapesDataset("val", length=args.val_length, config=world, seed=0)
    metrics = evaluate_zero_shot(model, val, batch_size=16)
    flat = {
        f"{name}_{side}": metrics[task][f"{name}_{side}"]
        for task, name in METRICS
        for side in ("seen", "unseen", "harmonic")
    }
    return {
        "variant": variant,
        "seed": seed,
        "kwargs": kwargs,
        **flat,
        "stage2_s": round(train_s, 1),
        **info,
        "eval_s": round(time.perf_counter() - start - train_s, 1),
    }


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for variant in VARIANTS:
        rows = [r for r in runs if r["variant"] == variant]
        if not rows:
            continue
        out[variant] = {"n": len(rows), "seeds": [r["seed"] for r in rows]}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if key.split("_")[0] in ("mIoU", "PQ", "SQ", "RQ", "AP50") and all(isinstance(v, float) for v in values):
                finite = [v for v in values if not math.isnan(v)]
                out[variant][key] = {
                    "mean": statistics.fmean(finite) if finite else math.nan,
                    "std": statistics.stdev(finite) if len(finite) > 1 else math.nan,
                    "per_seed": values,
                }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--stage2-steps", type=int, default=200)
    p.add_argument("--generator-lr", type=float, default=5e-4)
    p.add_argument(
        "--classifier-lr",
        type=float,
        default=1e-2,
        help="SGD lr of new_fc (official 1e-3 over 20 000 iterations; scaled up for the short budget)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--val-length", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--work-dir", default="runs/pading_shapes")
    p.add_argument("--out", default="benchmarks/results/experiments/pading_shapes.json")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    args = p.parse_args()
    if args.table:
        print(render_pading_table(json.loads(Path(args.out).read_text())))
        return
    from fastseg.data.shapes import zero_shot_config

    torch.set_num_threads(args.threads)
    world = zero_shot_config()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    report = {
        "command": command,
        "args": vars(args),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "device": "cpu",
        "world": {"classes": list(world.class_names), "unseen": list(world.unseen_classes)},
        "runs": [],
        "summary": {},
        "complete": False,
    }
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        report["runs"] = previous["runs"]
        report["commands"] = previous.get("commands", [previous["command"]]) + [command]
    done = {(r["variant"], r["seed"]) for r in report["runs"]}
    start = time.perf_counter()
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            used = (time.perf_counter() - start) / 60
            if used > args.max_minutes:
                report["stopped_early"] = f"wall-clock budget of {args.max_minutes} min used ({used:.1f} min)"
                break
            checkpoint = stage1(seed, args, world)
            record = run_one(variant, seed, checkpoint, args, world)
            report["runs"].append(record)
            report["summary"] = summarise(report["runs"])
            report["sweep_wall_s"] = round(time.perf_counter() - start, 1)
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps({k: v for k, v in record.items() if k != "last_losses"}), flush=True)
        if "stopped_early" in report:
            break
    report["complete"] = "stopped_early" not in report and {(r["variant"], r["seed"]) for r in report["runs"]} >= {
        (v, s) for v in args.variants for s in args.seeds
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
