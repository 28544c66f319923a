"""How one ``(variant, seed)`` job trains and is scored. Each recipe returns the job's JSON entry.

Every recipe trains with the experiment's :class:`~fastseg.experiments.core.Budget` on the shapes world: the training
images and their order depend on the seed only, the validation split is the same fixed one for every job.
Checkpoints go to the job's folder, so an interrupted job resumes where it stopped (``resume="auto"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data.shapes import ShapesConfig, ShapesDataset
from ..engine import TrainConfig, TrainResult, train
from ..registry import create_model
from .core import Experiment, Variant

# Per-class IoU and the other scalars of the evaluation dict that a results table may want.
_KEPT_METRICS = ("mIoU", "mAcc", "aAcc", "fwIoU")


def _world(experiment: Experiment) -> ShapesConfig:
    return ShapesConfig(image_size=experiment.budget.image_size)


def _train_config(experiment: Experiment, seed: int, job_dir: Path) -> TrainConfig:
    b = experiment.budget
    return TrainConfig(
        steps=b.steps,
        batch_size=b.batch_size,
        lr=b.lr,
        weight_decay=b.weight_decay,
        warmup_steps=b.warmup_steps,
        grad_clip=b.grad_clip,
        seed=seed,
        out_dir=str(job_dir),
        save_every=max(b.steps // 4, 1),
        eval_every=b.eval_every,
        progress=False,
        device="cpu",
        log_every=10,
        eval_batch_size=32,
    )


def _curve(job_dir: Path, metric: str) -> list[list[float]]:
    """``[[step, value], ...]`` of every evaluation the trainer logged in this job (resumed parts included)."""
    path = job_dir / "metrics.jsonl"
    points: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "eval" and f"val/{metric}" in record:
                points[int(record["step"])] = float(record[f"val/{metric}"])
    return [[step, points[step]] for step in sorted(points)]


def _entry(result: TrainResult, job_dir: Path, class_names: tuple[str, ...]) -> dict[str, Any]:
    if result.final_metrics is None:
        raise RuntimeError(f"training in {job_dir} returned without a final evaluation")
    metrics = result.final_metrics
    tail = result.history[-20:]
    entry = {k: float(metrics[k]) for k in _KEPT_METRICS if k in metrics}
    entry["IoU"] = {name: float(v) for name, v in zip(class_names, metrics["IoU"])}
    entry["final_loss"] = sum(r["loss"] for r in tail) / len(tail) if tail else None
    entry["curve_mIoU"] = _curve(job_dir, "mIoU")
    return entry


def supervised(experiment: Experiment, variant: Variant, seed: int, job_dir: Path) -> dict[str, Any]:
    """Fully supervised training of a registered model on ``steps * batch_size`` training images."""
    world = _world(experiment)
    b = experiment.budget
    torch.manual_seed(seed)
    model = create_model(variant.model, num_classes=world.num_classes, **variant.model_kwargs)
    train_set = ShapesDataset("train", length=b.steps * b.batch_size, config=world, seed=seed)
    val_set = ShapesDataset("val", length=b.val_length, config=world, seed=0)
    result = train(model, train_set, _train_config(experiment, seed, job_dir), val_set=val_set, resume="auto")
    entry = _entry(result, job_dir, world.class_names)
    entry["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    return entry


def semi_supervised(experiment: Experiment, variant: Variant, seed: int, job_dir: Path) -> dict[str, Any]:
    """Training at a labelled fraction (``recipe_kwargs``: ``labelled_fraction``, ``semi``: False for the
    supervised-only baseline on the labelled subset, ``train_length``)."""
    from ..engine.recipes.semi import build_training

    world = _world(experiment)
    b = experiment.budget
    kwargs = dict(variant.recipe_kwargs)
    torch.manual_seed(seed)
    # The labelled / unlabelled split is the world's (seed 0) for every job, as in the paper's fixed split files;
    # the seed changes the initialisation and the data order.
    model, train_set, loss_fn = build_training(
        variant.model,
        world=world,
        labelled_fraction=kwargs["labelled_fraction"],
        seed=0,
        train_length=kwargs.get("train_length", 4096),
        semi_supervised=kwargs.get("semi"),
        **variant.model_kwargs,
    )
    val_set = ShapesDataset("val", length=b.val_length, config=world, seed=0)
    result = train(
        model, train_set, _train_config(experiment, seed, job_dir), val_set=val_set, loss_fn=loss_fn, resume="auto"
    )
    entry = _entry(result, job_dir, world.class_names)
    entry["labelled_images"] = len(getattr(train_set, "labelled", train_set))
    return entry


RECIPES: dict[str, Callable[[Experiment, Variant, int, Path], dict[str, Any]]] = {
    "supervised": supervised,
    "semi": semi_supervised,
}


def run_job(experiment: Experiment, variant: Variant, seed: int, job_dir: Path) -> dict[str, Any]:
    try:
        recipe = RECIPES[variant.recipe]
    except KeyError:
        raise ValueError(
            f"variant {variant.name!r} names recipe {variant.recipe!r}; known: {sorted(RECIPES)}"
        ) from None
    return recipe(experiment, variant, seed, job_dir)
