"""S4MIM vs its UniMatch base vs supervised-only on the shapes world (64 x 64) at a small labelled fraction.

Variants (same DeepLabV3+ / ResNet-18, same steps, same labelled batch size, trained from scratch: nothing is
downloaded):

* ``supervised``: ``unimatch_resnet18`` trained on the labelled subset alone (plain cross-entropy);
* ``unimatch``: the UniMatch base (labelled batch + as many unlabelled images per step);
* ``s4mim``: ``s4mim_resnet18`` (class-wise MIM, per-class inputs, aggregation, label-space consistency);
* ``s4mim_plain_mim``: the same with image-level MIM instead of class-wise MIM (``mim="plain"``).

Runs go sequentially, seed-major (every variant of seed 0, then of seed 1, ...), and the JSON is rewritten after every
run so an interrupted sweep keeps what finished; ``--max-minutes`` stops starting new runs once the sweep has used that
much wall-clock time; ``--resume`` continues a sweep in the same JSON, skipping the runs it holds. Each run fixes the data (world seed 0: the same labelled subset for all) and varies the
initialisation, the data order and the augmentation draws with the run seed.

Usage (what produced ``benchmarks/results/experiments/s4mim_shapes.json``)::

    python benchmarks/experiments/s4mim_shapes.py --steps 120 --batch-size 4 --labelled-fraction 0.125 \
        --seeds 0 1 2 --val-length 128 --threads 1 --max-minutes 30
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.engine import TrainConfig, train
from fastseg.engine.recipes.semi import build_training

VARIANTS = {
    "supervised": ("unimatch_resnet18", {}, False),
    "unimatch": ("unimatch_resnet18", {}, True),
    "s4mim": ("s4mim_resnet18", {}, True),
    "s4mim_plain_mim": ("s4mim_resnet18", {"mim": "plain"}, True),
}


def run_one(variant: str, seed: int, args: argparse.Namespace, world: ShapesConfig) -> dict:
    name, kwargs, semi = VARIANTS[variant]
    torch.manual_seed(seed)
    model, train_set, loss_fn = build_training(name, world=world, labelled_fraction=args.labelled_fraction, seed=0,
                                               train_length=args.train_length, semi_supervised=semi, **kwargs)
    val_set = ShapesDataset("val", length=args.val_length, config=world, seed=0)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup, grad_clip=args.grad_clip, seed=seed, out_dir=None, progress=False,
                      device="cpu", log_every=10, eval_batch_size=32)
    start = time.perf_counter()
    result = train(model, train_set, cfg, val_set=val_set, loss_fn=loss_fn)
    wall = time.perf_counter() - start
    metrics = result.final_metrics or {}
    tail = result.history[-20:]

    def tail_mean(key: str) -> float | None:
        values = [r[key] for r in tail if key in r]
        return round(sum(values) / len(values), 4) if values else None

    return {"variant": variant, "model": name, "kwargs": kwargs, "semi_supervised": semi, "seed": seed,
            "mIoU": float(metrics["mIoU"]), "final_loss": tail_mean("loss"), "sup_loss_last20": tail_mean("sup"),
            "conf_ratio_last20": tail_mean("conf_ratio"), "rec_last20": tail_mean("rec"),
            "agg_last20": tail_mean("agg"), "sem_last20": tail_mean("sem"), "wall_s": round(wall, 1),
            "labelled_images": len(getattr(train_set, "labelled", train_set))}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for variant in VARIANTS:
        values = [r["mIoU"] for r in runs if r["variant"] == variant]
        if values:
            out[variant] = {"n": len(values), "mean_mIoU": round(statistics.fmean(values), 4),
                            "std_mIoU": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                            "min": round(min(values), 4), "max": round(max(values), 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4, help="labelled (and unlabelled) images per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--labelled-fraction", type=float, default=0.125)
    p.add_argument("--train-length", type=int, default=4096)
    p.add_argument("--val-length", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=30.0, help="start no new run after this much wall-clock")
    p.add_argument("--out", default="benchmarks/results/experiments/s4mim_shapes.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out and skip their (variant, seed); record this command too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world = ShapesConfig()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    report = {"command": command, "args": vars(args), "torch": torch.__version__,
              "machine": platform.machine(), "device": "cpu", "runs": [], "summary": {}, "complete": False}
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        report["runs"] = previous["runs"]
        report["commands"] = previous.get("commands", [previous["command"]]) + [command]
        report["earlier_sweep_wall_s"] = previous.get("earlier_sweep_wall_s", 0) + previous.get("sweep_wall_s", 0)
    done = {(r["variant"], r["seed"]) for r in report["runs"]}
    sweep_start = time.perf_counter()
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            used = (time.perf_counter() - sweep_start) / 60
            if used > args.max_minutes:
                report["stopped_early"] = f"wall-clock budget of {args.max_minutes} min used ({used:.1f} min)"
                break
            record = run_one(variant, seed, args, world)
            report["runs"].append(record)
            report["summary"] = summarise(report["runs"])
            report["sweep_wall_s"] = round(time.perf_counter() - sweep_start, 1)
            out.write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(record), flush=True)
        if "stopped_early" in report:
            break
    report["complete"] = "stopped_early" not in report
    report["sweep_wall_s"] = round(time.perf_counter() - sweep_start, 1)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
