"""ECENet vs the semantic FPN baseline on the shapes world, same backbone (ResNet-18), budget and steps.

Runs, sequentially, for every seed: ``fpn_resnet18``, ``ecenet_resnet18`` and (for ``--ablation-seeds``) ECENet
without the class-embedding path (``class_embeddings=False``). Each run trains from scratch (no pretrained
backbone: nothing is downloaded) with `fastseg.engine.train` and is evaluated on the same validation split. The JSON
is rewritten after every run, so an interrupted sweep keeps what finished.

Usage (what produced ``benchmarks/results/experiments/ecenet_vs_fpn.json``)::

    python benchmarks/experiments/ecenet_vs_fpn.py --steps 150 --batch-size 8 --seeds 0 1 2 --ablation-seeds 0 \
        --val-length 128 --threads 1

(150 steps because the shared 2-core machine gave each run a quarter of a core; more steps and seeds are better
where the CPU is free.)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import fastseg
from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.engine import TrainConfig, train

VARIANTS = {
    "fpn_resnet18": ("fpn_resnet18", {}),
    "ecenet_resnet18": ("ecenet_resnet18", {}),
    "ecenet_resnet18_no_class_embeddings": ("ecenet_resnet18", {"class_embeddings": False}),
}


def run_one(variant: str, seed: int, args: argparse.Namespace, world: ShapesConfig) -> dict:
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    model = fastseg.create_model(name, num_classes=world.num_classes, **kwargs)
    train_set = ShapesDataset("train", length=args.steps * args.batch_size, config=world, seed=seed)
    val_set = ShapesDataset("val", length=args.val_length, config=world, seed=0)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup, seed=seed, out_dir=None, progress=False, device="cpu", log_every=50,
        grad_clip=args.grad_clip,
    )
    start = time.perf_counter()
    result = train(model, train_set, cfg, val_set=val_set)
    wall = time.perf_counter() - start
    metrics = result.final_metrics or {}
    last = result.history[-1] if result.history else {}
    return {
        "variant": variant, "model": name, "kwargs": kwargs, "seed": seed,
        "mIoU": float(metrics["mIoU"]), "pixel_acc": float(metrics.get("aAcc", metrics.get("pixel_acc", float("nan")))),
        "final_loss": float(last.get("loss", float("nan"))), "wall_s": round(wall, 1),
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
    }


def summarise(runs: list[dict]) -> dict:
    out = {}
    for variant in VARIANTS:
        vals = [r["mIoU"] for r in runs if r["variant"] == variant]
        if vals:
            out[variant] = {
                "n": len(vals), "mIoU_mean": statistics.fmean(vals),
                "mIoU_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "mIoU_min": min(vals), "mIoU_max": max(vals),
                "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs if r["variant"] == variant),
            }
    by_seed = {(r["variant"], r["seed"]): r["mIoU"] for r in runs}
    for variant in ("ecenet_resnet18", "ecenet_resnet18_no_class_embeddings"):
        diffs = [by_seed[(variant, s)] - by_seed[("fpn_resnet18", s)]
                 for (v, s) in by_seed if v == variant and ("fpn_resnet18", s) in by_seed]
        if diffs:  # same seed = same training images and data order: a paired comparison
            out[f"{variant}_minus_fpn_paired"] = {
                "n": len(diffs), "mean": statistics.fmean(diffs),
                "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--grad-clip", type=float, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--val-length", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a shared 2-core box)")
    parser.add_argument("--out", default="benchmarks/results/experiments/ecenet_vs_fpn.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out (same steps / batch) and run only the missing ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = ShapesConfig(image_size=args.image_size)
    jobs = [(v, s) for s in args.seeds for v in ("fpn_resnet18", "ecenet_resnet18")]
    jobs += [("ecenet_resnet18_no_class_embeddings", s) for s in args.ablation_seeds]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "what": "val mIoU on the shapes world, ResNet-18 from scratch, same data / steps / optimiser per seed",
        "command": "python benchmarks/experiments/ecenet_vs_fpn.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None and not isinstance(v, bool)
        ) + (" --resume" if args.resume else ""),
        "config": {**vars(args), "optimizer": "adamw", "schedule": "linear warm-up then poly 0.9",
                   "num_classes": world.num_classes, "train_length": args.steps * args.batch_size},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "device": "cpu", "threads": args.threads},
        "runs": [], "summary": {},
    }
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        keep = ("steps", "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "val_length", "image_size")
        if any(previous["config"].get(k) != getattr(args, k) for k in keep):
            raise ValueError(f"--resume: {out} was made with other settings ({ {k: previous['config'].get(k) for k in keep} })")
        record["runs"] = previous["runs"]
        record["commands"] = previous.get("commands", [previous["command"]]) + [record["command"]]
    done = {(r["variant"], r["seed"]) for r in record["runs"]}
    for variant, seed in jobs:
        if (variant, seed) in done:
            continue
        run = run_one(variant, seed, args, world)
        record["runs"].append(run)
        record["summary"] = summarise(record["runs"])
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{variant:40s} seed {seed}: mIoU {run['mIoU']:.4f}  ({run['wall_s']:.0f} s)", flush=True)
    record["summary"] = summarise(record["runs"])
    out.write_text(json.dumps(record, indent=2) + "\n")
    for variant, s in record["summary"].items():
        if "mIoU_mean" in s:
            print(f"{variant:40s} n={s['n']} mIoU {100 * s['mIoU_mean']:.2f} +- {100 * s['mIoU_std']:.2f}")
        else:
            print(f"{variant:40s} n={s['n']} mIoU difference {100 * s['mean']:+.2f} +- {100 * s['std']:.2f}")


if __name__ == "__main__":
    main()
