"""Where a WeakTr CAM model finds (or loses) the shapes: pseudo-mask quality of each of its maps, and its attention.

For one WeakTr checkpoint (phase 1, or the CAM model of a SemPLeS run) on training images of the shapes world:

* per CAM source, through the same multi-scale inference and pseudo-mask path as the experiment
  (`fastseg.engine.recipes.semples.multiscale_cams`): the class tokens' attention to the patches (``cross``), the
  CAM head (``coarse``), their product (``fused``) and WeakTr's fine CAM (``fine``, the fused CAM propagated by the
  patch -> patch attention): pseudo-mask mIoU at the fixed threshold and at the threshold swept on ground truth, and
  the share of each shape's preferred texture labelled as the shape (lower is better);
* the patch-affinity purity of every layer and head: the share of a foreground patch's patch -> patch attention
  that lands on patches of its own class (ground truth pooled to the patch grid), beside the chance level; a map
  whose purity is near chance spreads the fine CAM over the image;
* how far the class tokens have moved apart (mean pairwise cosine; WeakTr starts them as copies of one token).

Usage::

    fastseg semples weaktr --model weaktr_shapes_clip --backbone-checkpoint CLIP --steps 400 --batch-size 16 \\
        --lr 2e-4 --seed 0 --out runs/weaktr
    python benchmarks/experiments/semples_cam_diagnosis.py --cam runs/weaktr/model.safetensors [MORE ...] [--json OUT]

With several ``--cam`` the JSON holds one entry per model, each with its training run's settings (``run.json``) and
last logged losses: ``benchmarks/results/experiments/weaktr_budget_check.json`` compares WeakTr phase-1 budgets and
learning rates this way.

It is a diagnosis tool: the numbers are one model's, not an experiment's (no seeds, no claims).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastseg.data.weak import WeakShapes
from fastseg.engine.recipes import semples as R
from fastseg.models.weaktr import WeakTr


@torch.no_grad()
def affinity_purity(model: WeakTr, data: WeakShapes) -> dict[str, float]:
    """Per map ``L<layer>H<head>``: mean over foreground patches of the share of their patch -> patch attention on
    patches of the same ground-truth class; ``chance``: the share of patches of the same class."""
    model.eval()
    k, p = model.num_cam_classes, model.patch_size
    samples = [data[i] for i in range(len(data))]
    images = torch.stack([s["image"] for s in samples])
    masks = torch.stack([s["mask"] for s in samples]).long()
    masks = torch.where(masks == data.ignore_index, 0, masks)  # ignored pixels count as background
    grid_h, grid_w = images.shape[-2] // p, images.shape[-1] // p
    patch_class = F.avg_pool2d(F.one_hot(masks, k + 1).permute(0, 3, 1, 2).float(), p).flatten(2).argmax(1)
    same = (patch_class[:, :, None] == patch_class[:, None, :]).float()
    foreground = patch_class > 0
    x = torch.cat([model.cls_tokens.expand(len(images), -1, -1), model.patch_embed(images)], 1)
    x = model.norm_pre(x + model._pos_embed(grid_h, grid_w))
    purity = {}
    for layer, blk in enumerate(model.blocks):
        x, attn, _ = WeakTr._block(blk, x)
        for head in range(attn.shape[1]):
            patch = attn[:, head, k:, k:]
            share = (patch * same).sum(-1) / patch.sum(-1).clamp_min(1e-12)
            purity[f"L{layer}H{head}"] = float(share[foreground].mean())
    purity["chance"] = float(same.mean(-1)[foreground].mean())
    return purity


def label_prior_loss(data: WeakShapes) -> float:
    """The multilabel soft-margin loss of the best constant prediction (each class's logit at its label frequency):
    a classification loss at this level has learnt nothing about the images."""
    labels = torch.stack([data[i]["image_labels"] for i in range(len(data))]).float()
    rate = labels.mean(0).clamp(1e-6, 1 - 1e-6)
    return float(-(rate * rate.log() + (1 - rate) * (1 - rate).log()).mean())


def diagnose(cam: str, model_name: str, length: int, threshold: float) -> dict:
    """Every figure above for one CAM model, beside the settings and the last logged losses of its training run
    (``run.json`` and ``metrics.jsonl`` beside the weights, when there)."""
    model = R.load_cam_model(cam, model_name)
    data = WeakShapes("train", length=length, with_masks=True)
    folder = Path(cam).parent
    report: dict = {"cam": cam}
    if (folder / "run.json").exists():
        report["run"] = json.loads((folder / "run.json").read_text())
    if (folder / "metrics.jsonl").exists():
        logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [row for row in logged if "loss" in row]
        if losses:
            tail = losses[-5:]
            keys = [k for k in tail[-1] if k.endswith("loss") and all(k in row for row in tail)]
            report["last_losses"] = {k: sum(row[k] for row in tail) / len(tail) for k in keys}
    print(cam)
    print(f"{'source':8} {'mIoU@t':>7} {'swept t':>8} {'mIoU swept':>10} {'texture leakage':>16}")
    for source in ("cross", "coarse", "fused", "fine"):
        swept = R.sweep_threshold(model, data, cam=source)
        fixed = swept["all"].get(threshold) or R.evaluate_cams(model, data, [threshold], cam=source)[threshold]
        leakage = [v for v in R.cooccurrence_leakage(model, data, threshold, cam=source) if v is not None]
        row = {
            "mIoU_fixed": float(fixed["mIoU"]),
            "swept_threshold": swept["threshold"],
            "mIoU_swept": float(swept["metrics"]["mIoU"]),
            "leakage_mean": sum(leakage) / len(leakage),
        }
        report[source] = row
        print(
            f"{source:8} {100 * row['mIoU_fixed']:7.1f} {row['swept_threshold']:8.2f} {100 * row['mIoU_swept']:10.1f}"
            f" {100 * row['leakage_mean']:16.1f}"
        )
    report["affinity_purity"] = affinity_purity(model, WeakShapes("train", length=128, with_masks=True))
    print("patch-affinity purity (share of a foreground patch's patch attention on its own class):")
    print("  " + "  ".join(f"{n} {v:.3f}" for n, v in report["affinity_purity"].items()))
    tokens = F.normalize(model.cls_tokens[0].detach(), dim=-1)
    k = tokens.shape[0]
    report["class_token_cosine"] = float(((tokens @ tokens.T).sum() - k) / (k * (k - 1)))
    print(f"class tokens: mean pairwise cosine {report['class_token_cosine']:.3f}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cam", required=True, nargs="+", help="WeakTr phase-1 weights, or a SemPLeS run's (several)")
    parser.add_argument("--model", default="weaktr_shapes_clip", help="the WeakTr variant of the weights")
    parser.add_argument("--length", type=int, default=256, help="training images scored (data seed 0)")
    parser.add_argument("--threshold", type=float, default=0.43, help="the fixed background threshold")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = [diagnose(cam, args.model, args.length, args.threshold) for cam in args.cam]
    if args.json:
        record = {
            "command": shlex.join(["python", *sys.argv]),
            "model": args.model,
            "length": args.length,
            "threshold": args.threshold,
            "label_prior_loss": label_prior_loss(WeakShapes("train", length=4096)),
            "models": models,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
