"""The mIoU of trivial predictors on the shapes world's val split, to put trained models' figures in context.

    python benchmarks/experiments/trivial_baseline.py [--out benchmarks/results/experiments/trivial_baseline.json]

* majority: every pixel gets the most frequent class of 512 training images;
* stuff-oracle: every pixel gets the image's most frequent *ground-truth* class (cheats; an upper bound of any
  predictor that only recognises the background texture).
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.metrics import ConfusionMatrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-length", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/experiments/trivial_baseline.json")
    args = parser.parse_args()

    cfg = ShapesConfig()
    ignore = cfg.ignore_index
    counts = torch.zeros(cfg.num_classes, dtype=torch.long)
    train = ShapesDataset("train", length=512, config=cfg, seed=0)
    for i in range(len(train)):
        mask = train[i]["mask"]
        counts += torch.bincount(mask[mask != ignore], minlength=cfg.num_classes)
    majority = int(counts.argmax())

    val = ShapesDataset("val", length=args.val_length, config=cfg, seed=0)
    results = {}
    for name in ("majority", "stuff-oracle"):
        matrix = ConfusionMatrix(cfg.num_classes, ignore_index=ignore)
        for i in range(len(val)):
            mask = val[i]["mask"]
            if name == "majority":
                label = majority
            else:
                label = int(torch.bincount(mask[mask != ignore], minlength=cfg.num_classes).argmax())
            matrix.update(torch.full_like(mask, label)[None], mask[None])
        metrics = matrix.compute()
        results[name] = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")}
        print(f"{name:13s} mIoU {metrics['mIoU']:.4f}  mAcc {metrics['mAcc']:.4f}  aAcc {metrics['aAcc']:.4f}")
    results["command"] = shlex.join(["python", *sys.argv])
    results["majority_class"] = cfg.class_names[majority]
    results["val_length"] = args.val_length
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
