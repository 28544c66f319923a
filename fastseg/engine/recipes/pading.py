"""PADing's two stages on the shapes world (spec C.1, C.5, C.7).

* Stage 1, seen-only Mask2Former (`seen_only_dataset`, `mark_seen_only`): the official protocols are kept: for
  panoptic and instance training every image containing an unseen class is removed (the shapes world's
  ``unseen="exclude"`` draws no unseen class at all, i.e. exactly the images that survive the filter); for semantic
  training unseen pixels are ignored (``unseen="ignore"``). The checkpoint records the protocol in its metadata, and
  stage 2 refuses a checkpoint without it.
* Stage 2 (`train_stage2`): the segmenter is frozen (and kept in eval mode); every iteration makes two optimiser
  steps on one batch: step G (Adam, lr 5e-4, no weight decay, linear warm-up over ``warmup_steps`` then x0.1 at each
  milestone) on the generator side with ``L_G``; step D (SGD, lr 1e-3, momentum 0.9, weight decay 5e-4, no schedule)
  on ``new_fc`` with the weighted classifier CE. ``grad``s of ``new_fc`` from step G are discarded by step D's
  ``zero_grad`` as in the official loop.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ... import checkpoint as ckpt
from ...data.shapes import ShapesConfig, ShapesDataset
from ...models.pading import PADing, stage1_protocol
from ..distributed import StepBatchSampler
from ..evaluate import batch_to_device

__all__ = [
    "Stage2Config",
    "Stage2Result",
    "evaluate_zero_shot",
    "format_zero_shot",
    "harmonic_mean",
    "mark_seen_only",
    "seen_only_dataset",
    "seen_only_segmenter",
    "train_stage2",
]

TASKS = ("panoptic", "instance", "semantic")


def seen_only_dataset(
    world: ShapesConfig, task: str, split: str = "train", length: int | None = None, seed: int = 0, **kwargs: Any
) -> ShapesDataset:
    """The stage-1 training set of the zero-shot protocol for ``task`` (see the module docstring)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_split(world.seen_ids, world.unseen_ids)
    unseen = "ignore" if task == "semantic" else "exclude"
    return ShapesDataset(split, length=length, config=world, seed=seed, unseen=unseen, **kwargs)


def check_split(seen: Sequence[int], unseen: Sequence[int]) -> None:
    if not unseen:
        raise ValueError("the seen / unseen split has no unseen class: set ShapesConfig(unseen_classes=...)")
    if not seen:
        raise ValueError("the seen / unseen split has no seen class: every class is unseen, nothing can be trained")


def seen_only_segmenter(model_name: str, world: ShapesConfig, task: str, **kwargs: Any) -> nn.Module:
    """A fresh Mask2Former for stage 1 on ``world`` (its class names, palette and stuff / thing split), marked
    seen-only so that its checkpoints can start stage 2."""
    from ...data.shapes import pretrained_cfg_fields
    from ...models.pading import apply_cfg_fields
    from ...registry import create_model

    if not model_name.startswith("mask2former"):
        raise ValueError(f"--seen-only trains PADing's stage 1, a Mask2Former; got {model_name!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_split(world.seen_ids, world.unseen_ids)
    if task == "semantic":
        kwargs.setdefault("train_task", "semantic")
    model = create_model(model_name, num_classes=world.num_classes, **kwargs)
    apply_cfg_fields(model, pretrained_cfg_fields(world))
    mark_seen_only(model, task, world.unseen_ids)
    return model


def mark_seen_only(model: nn.Module, task: str, unseen_ids: Sequence[int]) -> None:
    """Record the seen-only protocol in every checkpoint the trainer writes of ``model``."""
    meta = dict(getattr(model, "checkpoint_metadata", None) or {})
    meta.update(stage1_protocol(task, unseen_ids))
    model.checkpoint_metadata = meta


@dataclass
class Stage2Config:
    """Stage-2 schedule (official values in parentheses; the iteration count is scaled to the shapes world).

    Attributes:
        steps: iterations, each one generator and one classifier step (panoptic 20 000).
        batch_size: images per iteration (12).
        generator_lr: Adam learning rate of the generator side (5e-4).
        generator_milestones: iterations where the generator lr is multiplied by ``generator_gamma`` (panoptic:
            14 000 and 18 500, i.e. 70 % and 92.5 %); ``None`` = those fractions of ``steps``.
        warmup_steps: linear warm-up of the generator lr (10).
        classifier_lr, classifier_momentum, classifier_weight_decay: SGD on ``new_fc`` (1e-3, 0.9, 5e-4).
        out_dir: where ``model.safetensors`` and ``metrics.jsonl`` go (None: nothing written).
    """

    steps: int = 300
    batch_size: int = 8
    generator_lr: float = 5e-4
    generator_milestones: tuple[int, ...] | None = None
    generator_gamma: float = 0.1
    warmup_steps: int = 10
    classifier_lr: float = 1e-3
    classifier_momentum: float = 0.9
    classifier_weight_decay: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    out_dir: str | None = None
    log_every: int = 10
    num_workers: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"Stage2Config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("generator_lr", "classifier_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Stage2Config.{name} must be > 0, got {getattr(self, name)}")

    def milestones(self) -> tuple[int, ...]:
        if self.generator_milestones is not None:
            return tuple(self.generator_milestones)
        return (int(0.7 * self.steps), int(0.925 * self.steps))


@dataclass
class Stage2Result:
    steps: int = 0
    skipped_generator_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    weights: Path | None = None


def _generator_lr_factor(step: int, cfg: Stage2Config) -> float:
    # detectron2's WarmupMultiStepLR: linear warm-up from 1/1000 over warmup_steps, then gamma per milestone.
    warm = 1.0
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        warm = 1e-3 * (1 - alpha) + alpha
    return warm * cfg.generator_gamma ** sum(step >= m for m in cfg.milestones())


def train_stage2(
    model: PADing, dataset: Dataset, cfg: Stage2Config, metadata: dict[str, str] | None = None
) -> Stage2Result:
    """Run PADing's stage 2 on ``dataset`` (which must hold seen-class ground truth only, as stage 1's did)."""
    if not isinstance(model, PADing):
        raise ValueError(f"train_stage2 needs a PADing model, got {type(model).__name__}")
    cfg.validate()
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the stage-2 training set is empty")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    frozen = [
        p
        for p in model.segmenter.parameters()
        if p.requires_grad and p is not model.head.new_fc.weight and p is not model.head.new_fc.bias
    ]
    if frozen:
        raise ValueError(f"{len(frozen)} segmenter parameters still require grad: the segmenter must be frozen")
    head = model.head
    # Fused optimiser steps (one kernel for all parameters on CPU and CUDA): measured 2244 -> 1564 operator calls
    # per iteration and the Adam step 3x faster (benchmarks/experiments/pading_stage2_profile.py); same update rule.
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    opt_g = torch.optim.Adam(head.generator_parameters(), lr=cfg.generator_lr, weight_decay=0.0, **fused)
    opt_c = torch.optim.SGD(
        head.new_fc.parameters(),
        lr=cfg.classifier_lr,
        momentum=cfg.classifier_momentum,
        weight_decay=cfg.classifier_weight_decay,
        **fused,
    )
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: _generator_lr_factor(s, cfg))
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, 0, cfg.steps)  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers)
    pick = torch.Generator().manual_seed(cfg.seed + 1)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    log = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = (out_dir / "metrics.jsonl").open("a")
    result = Stage2Result()
    start = time.perf_counter()
    try:
        for step, batch in enumerate(loader):
            batch = batch_to_device(batch, device)
            embed, all_classes = model.matched_queries(batch)
            record: dict[str, float] = {"step": step + 1, "generator_lr": opt_g.param_groups[0]["lr"]}
            if bool((all_classes != model.num_classes).any()):  # step G
                losses = model.generator_step_losses(embed, all_classes)
                if not torch.isfinite(losses["loss"]):
                    raise FloatingPointError(f"stage 2: generator loss is {float(losses['loss'])} at step {step + 1}")
                opt_g.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt_g.step()
                record.update({k: float(v.detach()) for k, v in losses.items()})
            else:
                result.skipped_generator_steps += 1
            sched_g.step()
            cls = model.classifier_step_loss(embed, all_classes, pick)  # step D
            opt_c.zero_grad(set_to_none=True)
            cls["loss"].backward()
            opt_c.step()
            record["classifier_loss"] = float(cls["loss"].detach())
            result.steps = step + 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                result.history.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
    finally:
        if log is not None:
            log.close()
    result.seconds = time.perf_counter() - start
    if out_dir is not None:
        meta = {
            "architecture": getattr(model, "model_name", "pading"),
            "stage": "2",
            "task": model.task,
            "class_embeddings": model.embeddings_source,
            "seen_classes": json.dumps(model.seen_classes),
            "unseen_classes": json.dumps(model.unseen_classes),
            "stage2_config": json.dumps(asdict(cfg)),
            "num_classes": str(model.num_classes),
            **(metadata or {}),
        }
        result.weights = ckpt.save_weights(model, out_dir / "model.safetensors", meta)
    return result


# ------------------------------------------------------------------------------------------------------ evaluation
def harmonic_mean(seen: float, unseen: float) -> float:
    """``2 s u / (s + u)`` (the GZS protocol's h; NaN when either side is NaN, 0 when both are 0)."""
    if math.isnan(seen) or math.isnan(unseen):
        return math.nan
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


@torch.no_grad()
def evaluate_zero_shot(
    model: PADing, dataset: Dataset, tasks: Sequence[str] = TASKS, batch_size: int = 16, device: str = "cpu"
) -> dict[str, Any]:
    """mIoU, PQ / SQ / RQ and mask AP50 (GZSI: thing classes only), each over seen, unseen and their harmonic mean.

    The dataset must keep unseen classes (``unseen="keep"``) and carry ``instances`` / ``instance_classes``. The
    numbers come from `fastseg.engine.evaluate` (confusion-matrix mIoU) and `evaluate_universal` (PQ, mask AP)
    restricted to the seen and the unseen classes.
    """
    from ..evaluate import evaluate
    from ..evaluate_universal import evaluate_universal

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; choose from {TASKS}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the evaluation set is empty")
    model.to(torch.device(device)).eval()
    seen, unseen = model.seen_classes, model.unseen_classes
    out: dict[str, Any] = {"seen_classes": seen, "unseen_classes": unseen}
    if "semantic" in tasks:
        iou = [float(v) for v in evaluate(model, dataset, batch_size=batch_size, device=device, progress=False)["IoU"]]
        s, u = _nanmean([iou[c] for c in seen]), _nanmean([iou[c] for c in unseen])
        out["semantic"] = {
            "mIoU": _nanmean(iou),
            "mIoU_seen": s,
            "mIoU_unseen": u,
            "mIoU_harmonic": harmonic_mean(s, u),
            "IoU": iou,
        }
    universal = [t for t in ("panoptic", "instance") if t in tasks]
    if universal:
        res = evaluate_universal(
            model, dataset, universal, batch_size=batch_size, subsets={"seen": seen, "unseen": unseen}
        )
        if "panoptic" in res:
            pq = res["panoptic"]
            pan: dict[str, Any] = {"PQ": pq["PQ"], "SQ": pq["SQ"], "RQ": pq["RQ"]}
            for m in ("PQ", "SQ", "RQ"):
                pan[f"{m}_seen"], pan[f"{m}_unseen"] = pq["seen"][m], pq["unseen"][m]
                pan[f"{m}_harmonic"] = harmonic_mean(pan[f"{m}_seen"], pan[f"{m}_unseen"])
            out["panoptic"] = pan
        if "instance" in res:
            ap = res["instance"]
            s, u = ap["seen"]["AP50"], ap["unseen"]["AP50"]
            out["instance"] = {
                "AP50": ap["AP50"],
                "AP50_seen": s,
                "AP50_unseen": u,
                "AP50_harmonic": harmonic_mean(s, u),
            }
    return out


def format_zero_shot(metrics: dict[str, Any]) -> str:
    """The seen / unseen / harmonic table `fastseg eval` prints for PADing (percent)."""
    rows = [("metric", "seen", "unseen", "harmonic")]
    for task, names in (("semantic", ("mIoU",)), ("panoptic", ("PQ", "SQ", "RQ")), ("instance", ("AP50",))):
        for name in names if task in metrics else ():
            m = metrics[task]
            rows.append(
                (f"{name} ({task})", *(f"{100 * m[f'{name}_{s}']:.1f}" for s in ("seen", "unseen", "harmonic")))
            )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )
