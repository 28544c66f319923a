"""How one ``(variant, seed)`` job trains and is scored. Each recipe returns the job's JSON entry.

Every recipe trains with the experiment's :class:`~fastseg.experiments.core.Budget` on the shapes world: the training
images and their order depend on the seed only, the validation split is the same fixed one for every job.
Checkpoints go to the job's folder, so an interrupted job resumes where it stopped (``resume="auto"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write
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
    entry: dict[str, Any] = {k: float(metrics[k]) for k in _KEPT_METRICS if k in metrics}
    entry["IoU"] = {name: float(v) for name, v in zip(class_names, metrics["IoU"])}
    entry["final_loss"] = sum(r["loss"] for r in tail) / len(tail) if tail else None
    entry["curve_mIoU"] = _curve(job_dir, "mIoU")
    if result.start_step:  # the run's wall_s then times only the steps after this one
        entry["resumed_from_step"] = result.start_step
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


# ----------------------------------------------------------------------------------------------------------------
# Weakly supervised (SemPLeS and its baselines): a CAM method -> pseudo masks -> the final segmenter
# ----------------------------------------------------------------------------------------------------------------
WSSS_METHODS = ("plain_cam", "plain_cam_vit", "weaktr", "semples_a", "semples_c", "supervised")


def _once(out_dir: Path, settings: dict[str, Any], make: Callable[[], Any]) -> Path:
    """``out_dir/model.safetensors``, trained by ``make`` unless a finished run left it there (``make`` itself
    resumes an interrupted run from its last checkpoint). ``settings`` (what the run is trained with) is written
    beside it first; a folder holding a run of other settings is an error, never silently reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "experiment_settings.json"
    text = json.dumps(settings, sort_keys=True, default=str)
    if record.exists() and record.read_text() != text:
        raise ValueError(
            f"{out_dir} holds a run of other settings ({record.read_text()}; asked for {text}); move the folder "
            "away to train it again"
        )
    record.write_text(text)
    weights = out_dir / "model.safetensors"
    if not weights.exists():
        make()
    return weights


def shapes_clip(settings: dict[str, Any], root: Path) -> tuple[Path, dict[str, Any]]:
    """The tiny CLIP every SemPLeS run of one experiment shares, trained once under ``root/clip`` (resumable) by
    `fastseg.engine.recipes.clip.train_clip`; returns its weights and its retrieval accuracy."""
    from ..engine.recipes.clip import train_clip

    clip = settings["clip"]
    out = root / "clip"
    weights = _once(
        out,
        clip,
        lambda: train_clip(
            out,
            config_name=clip["config"],
            steps=clip["steps"],
            batch_size=clip["batch_size"],
            lr=clip["lr"],
            seed=clip.get("seed", 0),
            train_length=clip.get("train_length", 4096),
            eval_length=clip.get("eval_length", 256),
            save_every=max(clip["steps"] // 8, 1),
            device="cpu",
        ),
    )
    retrieval = json.loads((out / "retrieval.json").read_text())
    return weights, {k: retrieval[k] for k in ("image_to_text_top1", "zero_shot_shape_top1") if k in retrieval}


def _cam_method(method: str, settings: dict[str, Any], seed: int, job_dir: Path) -> tuple[Any, str, dict[str, Any]]:
    """Train (or find) the CAM model of ``method`` for ``seed``; returns it, the CAM it is read through, and what the
    job records about its training. Prerequisites shared between variants (the CLIP, the seed's WeakTr weights, the
    seed's run (a)) live in their own folders beside the job's, so every variant can run alone and none trains twice."""
    from ..engine.recipes import semples as R
    from ..models.clip import build_clip

    root = job_dir.parent
    cam = settings["cam"]
    common = dict(seed=seed, train_length=settings["train_length"], device="cpu", save_every=50)
    if method == "plain_cam":
        weights = _once(
            job_dir / "cam",
            {"method": method, "seed": seed, **cam, "train_length": settings["train_length"]},
            lambda: R.train_plain_cam(
                job_dir / "cam", steps=cam["steps"], batch_size=cam["batch_size"], lr=cam["plain_lr"], **common
            ),
        )
        return R.load_plain_cam(weights), "coarse", {"cam_steps": cam["steps"]}
    clip_weights, clip_record = shapes_clip(settings, root)
    info: dict[str, Any] = {"clip": clip_record}

    def weaktr(out: Path, coarse_only: bool = False) -> Path:
        return _once(
            out,
            {
                "coarse_only": coarse_only,
                "seed": seed,
                **cam,
                "train_length": settings["train_length"],
                "clip": clip_record,
            },
            lambda: R.train_weaktr(
                out,
                model_name=cam["model"],
                steps=cam["steps"],
                batch_size=cam["batch_size"],
                lr=cam["lr"],
                backbone_checkpoint=clip_weights,
                coarse_only=coarse_only,
                **common,
            ),
        )

    if method == "plain_cam_vit":
        weights = weaktr(job_dir / "cam", coarse_only=True)
        return R.load_cam_model(weights, cam["model"]), "coarse", {**info, "cam_steps": cam["steps"]}
    weaktr_weights = weaktr(root / f"weaktr-seed{seed}" / "cam")
    if method == "weaktr":
        return R.load_cam_model(weaktr_weights, cam["model"]), "fine", {**info, "cam_steps": cam["steps"]}
    semples = settings["semples"]
    clip = build_clip(settings["clip"]["config"], clip_weights, require_checkpoint=True)
    options = R.RunOptions(
        steps=semples["steps"], batch_size=semples["batch_size"], lr=semples["lr"], model_name=cam["model"], **common
    )

    stage_settings = {"seed": seed, "cam": cam, **semples, "train_length": settings["train_length"]}

    def run_a(out: Path) -> Path:
        return _once(
            out,
            {"run": "a", **stage_settings},
            lambda: R.run_segment_label_matching(weaktr_weights, clip, out, options),
        )

    extra = {"a": semples["steps"]}
    if method == "semples_a":
        weights = run_a(job_dir / "a")
    elif method == "semples_c":
        a_weights = run_a(root / f"semples_a-seed{seed}" / "a")
        b_weights = _once(
            job_dir / "b",
            {"run": "b", **stage_settings},
            lambda: R.run_prompt_learning(
                a_weights, clip, job_dir / "b", dataclasses.replace(options, lr=semples["prompt_lr"])
            ),
        )
        weights = _once(
            job_dir / "c",
            {"run": "c", **stage_settings},
            lambda: R.run_prompt_refinement(weaktr_weights, b_weights, clip, job_dir / "c", options),
        )
        extra = {"a": semples["steps"], "b": semples["steps"], "c": semples["steps"]}
    else:
        raise ValueError(f"unknown weakly supervised method {method!r}; known: {WSSS_METHODS}")
    return R.load_cam_model(weights, cam["model"]), "fine", {**info, "cam_steps": cam["steps"], "extra_steps": extra}


def _cam_entry(model: Any, cam: str, settings: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Pseudo-mask quality on train images (fixed threshold; the official GT-peeking sweep, reported apart), the
    co-occurrence leakage per shape and the image-level classification of the CAM model on val."""
    from ..data.weak import WeakShapes
    from ..engine.recipes import semples as R

    threshold = settings["threshold"]
    data = WeakShapes("train", length=settings["eval_length"], with_masks=True)
    swept = R.sweep_threshold(model, data, cam=cam)
    fixed = swept["all"].get(threshold) or R.evaluate_cams(model, data, [threshold], cam=cam)[threshold]
    leakage = R.cooccurrence_leakage(model, data, threshold, cam=cam)
    known = [v for v in leakage if v is not None]
    key = "coarse_logits" if cam == "coarse" else "cls_logits"
    return {
        "pseudo_mIoU_fixed": float(fixed["mIoU"]),
        "pseudo_IoU_fixed": {n: float(v) for n, v in zip(names, fixed["IoU"])},
        "swept_threshold": swept["threshold"],
        "pseudo_mIoU_swept": float(swept["metrics"]["mIoU"]),
        "pseudo_IoU_swept": {n: float(v) for n, v in zip(names, swept["metrics"]["IoU"])},
        "leakage": dict(zip(names[1:], leakage)),
        "leakage_mean": sum(known) / len(known) if known else None,
        "classification": {
            "logits": key,
            **R.classification_map(model, WeakShapes("val", length=settings["eval_length"]), key),
        },
    }


class _WeakGroundTruth(torch.utils.data.Dataset):
    """World training images with their ground truth in the weakly supervised label space (background + shapes):
    the fully supervised reference the pseudo masks are measured against."""

    def __init__(self, length: int) -> None:
        self.world = ShapesDataset("train", length=length)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from ..data.weak import to_weak_mask

        sample = self.world[i]
        return {"image": sample["image"], "mask": to_weak_mask(sample["mask"], self.world.config)}


def weakly_supervised(experiment: Experiment, variant: Variant, seed: int, job_dir: Path) -> dict[str, Any]:
    """One weakly supervised method (``recipe_kwargs["method"]``, one of `WSSS_METHODS`): its CAM model from
    image-level labels, pseudo masks at the fixed threshold, then ``variant.model`` trained on them with the
    experiment's budget and scored on val (``"supervised"``: the same segmenter on ground truth)."""
    from ..data.pseudo import PseudoMaskDataset
    from ..data.weak import WeakShapes, weak_class_names
    from ..engine.recipes import semples as R

    settings = dict(variant.recipe_kwargs)
    method = settings["method"]
    if method not in WSSS_METHODS:
        raise ValueError(f"unknown weakly supervised method {method!r}; known: {WSSS_METHODS}")
    names = weak_class_names()
    torch.manual_seed(seed)
    entry: dict[str, Any] = {"method": method}
    if method == "supervised":
        train_set: torch.utils.data.Dataset = _WeakGroundTruth(settings["pseudo_length"])
    else:
        model, cam, info = _cam_method(method, settings, seed, job_dir)
        entry.update(info)
        entry.update(_cam_entry(model, cam, settings, names))
        pseudo = job_dir / "pseudo"
        if not pseudo.exists():
            R.write_pseudo_masks(
                model, pseudo, length=settings["pseudo_length"], threshold=settings["threshold"], crf="off", cam=cam
            )
        train_set = PseudoMaskDataset(pseudo)
    b = experiment.budget
    torch.manual_seed(seed)
    segmenter = create_model(variant.model, num_classes=len(names))
    val_set = WeakShapes("val", length=b.val_length, with_masks=True)
    seg_dir = job_dir / "segmenter"
    result = train(segmenter, train_set, _train_config(experiment, seed, seg_dir), val_set=val_set, resume="auto")
    entry.update(_entry(result, seg_dir, names))
    return entry


def _per_class(names: tuple[str, ...], values: Any) -> dict[str, float | None]:
    """Per-class figures by name; ``None`` for a class absent from the evaluation (NaN is not JSON)."""
    return {n: (None if math.isnan(float(v)) else float(v)) for n, v in zip(names, values)}


# ----------------------------------------------------------------------------------------------------------------
# GSS: a frozen tokenizer fitted once per (kind, seed), then GSS-FF end to end, or GSS-FT-W from a GSS-FF job
# ----------------------------------------------------------------------------------------------------------------

_TOKENIZER_KINDS = ("images", "masks")


def _cached(folder: Path, config: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``build(folder)`` once: its info dict is stored as ``folder/info.json`` (written last, so a half-built folder
    is rebuilt) and returned on later calls; a folder built with another ``config`` is refused, not reused."""
    info_file = folder / "info.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("config") != config:
            raise ValueError(
                f"{folder} was built with {info.get('config')}, the declaration now asks for {config}; move the "
                f"folder away (or restore the declaration) before running again"
            )
        return info
    folder.mkdir(parents=True, exist_ok=True)
    info = {"config": config, **build(folder)}
    text = json.dumps(info, indent=1)
    atomic_write(info_file, lambda f: f.write(text.encode()))
    return info


def _gss_tokenizer(
    model: torch.nn.Module, kwargs: dict[str, Any], experiment: Experiment, seed: int, root: Path
) -> dict[str, Any]:
    """Fit ``model.tokenizer`` (in place) as ``kwargs["tokenizer"]`` says, or load it from the job-independent cache
    ``root/tokenizer-<kind>-seed<k>/``; returns the cache's info (its configuration, codes in use, the fit's last
    logged losses and time, the weights file). The round trip is measured by the ``gss_roundtrip`` recipe, not here.

    ``"images"``: `fit_image_tokenizer`, the faithful setting: the world's RGB training images only (the first
    ``tokenizer_steps * tokenizer_batch`` images of the seed's training stream, no label read). ``"masks"``:
    `train_maskige_vqvae` on maskiges of the same images' label maps with the class-aware palette term (ours).
    """
    from ..checkpoint import load_weights, save_weights
    from ..engine.recipes.gss import TOKENIZER_TRAINED_ON, fit_image_tokenizer, train_maskige_vqvae

    kind = kwargs["tokenizer"]
    if kind not in _TOKENIZER_KINDS:
        raise ValueError(f"GSS recipe: tokenizer must be one of {_TOKENIZER_KINDS}, got {kind!r}")
    world = _world(experiment)
    config = {
        "trained_on": kind,
        "steps": kwargs["tokenizer_steps"],
        "batch_size": kwargs["tokenizer_batch"],
        "lr": kwargs["tokenizer_lr"],
        "colour_augment": bool(kwargs.get("colour_augment", False)),
        "seed": seed,
        "model": "gss_ff_resnet18",
    }
    weights = root / f"tokenizer-{kind}-seed{seed}" / "tokenizer.safetensors"

    def fit(folder: Path) -> dict[str, Any]:
        steps, batch = config["steps"], config["batch_size"]
        data = ShapesDataset("train", length=steps * batch, config=world, seed=seed)
        # The image fit collates "image" alone, so it cannot see a label; the class-aware fit collates the masks.
        field = "image" if kind == "images" else "mask"

        def collate(items: list[dict[str, torch.Tensor]]) -> Any:
            stacked = torch.stack([item[field] for item in items])
            return {"image": stacked} if kind == "images" else stacked

        loader = torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=collate)
        torch.manual_seed(seed)
        start = time.perf_counter()
        if kind == "images":
            history = fit_image_tokenizer(
                model.tokenizer,
                loader,
                steps,
                config["lr"],
                data.mean,
                data.std,
                colour_augment=config["colour_augment"],
            )
        else:
            history = train_maskige_vqvae(model.tokenizer, model.maskige_palette, loader, steps, config["lr"])
        wall = time.perf_counter() - start
        save_weights(model.tokenizer, weights, {TOKENIZER_TRAINED_ON: kind, "seed": str(seed)})
        return {
            "tokens_used": int(model.tokenizer.quantizer.cluster_size.gt(0.05).sum()),
            "vocab_size": model.tokenizer.vocab_size,
            "fit_wall_s": round(wall, 1),
            "final": history[-1],
        }

    info = _cached(weights.parent, config, fit)
    load_weights(model.tokenizer, weights)  # a no-op after a fit; the cached weights otherwise
    model.tokenizer.requires_grad_(False)
    model.tokenizer_trained_on = kind
    return {**info, "file": weights.as_posix()}


def gss_roundtrip(experiment: Experiment, variant: Variant, seed: int, job_dir: Path) -> dict[str, Any]:
    """The round trip of the tokenizer that the ``gss`` variants of the same ``recipe_kwargs`` and seed use (GT ->
    maskige -> tokens -> maskige -> classes on the validation split; `roundtrip_miou`): fits it into the shared cache
    when no GSS job has yet. Its ``mIoU`` is what GSS-FF would reach by predicting the encoder's tokens exactly."""
    from ..engine.recipes.gss import roundtrip_miou

    world, b = _world(experiment), experiment.budget
    torch.manual_seed(seed)
    model = create_model(variant.model, num_classes=world.num_classes, **variant.model_kwargs)
    tokenizer = _gss_tokenizer(model, dict(variant.recipe_kwargs), experiment, seed, job_dir.parent)
    val = ShapesDataset("val", length=b.val_length, config=world, seed=0)
    rt = roundtrip_miou(
        model.tokenizer,
        model.maskige_palette,
        (val[i] for i in range(len(val))),
        world.num_classes,
        maskige_scale=model.maskige_scale,
    )
    return {"mIoU": float(rt["mIoU"]), "IoU": _per_class(world.class_names, rt["IoU"]), "tokenizer": tokenizer}


def gss(experiment: Experiment, variant: Variant, seed: int, job_dir: Path) -> dict[str, Any]:
    """GSS on the shapes world. ``recipe_kwargs``: ``tokenizer`` (``"images"``: the faithful image-only fit,
    ``"masks"``: the class-aware one, ours), ``tokenizer_steps`` / ``tokenizer_batch`` / ``tokenizer_lr``,
    ``colour_augment``; for GSS-FT-W ``init_from`` (the GSS-FF variant whose job of the same seed it starts from)
    and ``steps`` (the inverse-only steps; the budget's batch, lr and schedule otherwise).

    GSS-FF trains exactly as the supervised recipe does (same images, order, optimiser) around a frozen tokenizer,
    so its runs pair with the FPN's. GSS-FT-W copies backbone, prior head and tokenizer from the final weights of
    the GSS-FF job and trains only the learned inverse.
    """
    from ..engine.trainer import FINAL_WEIGHTS

    world = _world(experiment)
    kwargs = dict(variant.recipe_kwargs)
    init_from = kwargs.get("init_from")
    if init_from is not None:
        steps = int(kwargs["steps"])
        experiment = dataclasses.replace(experiment, budget=dataclasses.replace(experiment.budget, steps=steps))
    b = experiment.budget
    ff_weights = job_dir.parent / f"{init_from}-seed{seed}" / FINAL_WEIGHTS if init_from is not None else None
    if ff_weights is not None and not ff_weights.exists():
        raise FileNotFoundError(
            f"{variant.name} starts from the {init_from!r} job of seed {seed}, whose final weights {ff_weights} do "
            f"not exist: run that job first (declare it before {variant.name!r})"
        )
    torch.manual_seed(seed)
    model = create_model(variant.model, num_classes=world.num_classes, **variant.model_kwargs)
    tokenizer = _gss_tokenizer(model, kwargs, experiment, seed, job_dir.parent)
    if ff_weights is not None:
        from ..checkpoint import load_state_dict

        prior = load_state_dict(ff_weights)
        if not torch.equal(prior["maskige_palette"], model.maskige_palette):
            raise ValueError(f"{ff_weights} was trained with another maskige palette")
        model.load_prior(prior)  # backbone, prior head and the same frozen tokenizer
    train_set = ShapesDataset("train", length=b.steps * b.batch_size, config=world, seed=seed)
    val_set = ShapesDataset("val", length=b.val_length, config=world, seed=0)
    result = train(model, train_set, _train_config(experiment, seed, job_dir), val_set=val_set, resume="auto")
    entry = _entry(result, job_dir, world.class_names)
    entry["steps"] = b.steps
    entry["tokenizer"] = tokenizer
    if ff_weights is not None:
        entry["init_from"] = ff_weights.as_posix()
    entry["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    return entry


# ----------------------------------------------------------------------------------------------------------------
# PADing: a seen-only Mask2Former per seed (shared by every variant), then stage 2, zero-shot evaluation
# ----------------------------------------------------------------------------------------------------------------

PADING_METRICS = tuple(
    f"{name}_{side}" for name in ("mIoU", "PQ", "SQ", "RQ", "AP50") for side in ("seen", "unseen", "harmonic")
)


def _pading_stage1(experiment: Experiment, kwargs: dict[str, Any], seed: int, root: Path) -> Path:
    """The seen-only Mask2Former of ``seed`` (stage 1, panoptic protocol), trained once into ``root/stage1-seed<k>``
    and shared by every variant of that seed; an interrupted stage 1 resumes from its last checkpoint."""
    from ..data.shapes import zero_shot_config
    from ..engine.recipes.pading import seen_only_dataset, seen_only_segmenter
    from ..engine.trainer import FINAL_WEIGHTS

    stage1 = dict(kwargs["stage1"])
    config = {**stage1, "batch_size": experiment.budget.batch_size, "seed": seed, "model": "mask2former_resnet18"}
    folder = root / f"stage1-seed{seed}"

    def fit(folder: Path) -> dict[str, Any]:
        world = zero_shot_config(image_size=experiment.budget.image_size)
        torch.manual_seed(seed)
        seg = seen_only_segmenter(config["model"], world, "panoptic")
        data = seen_only_dataset(world, "panoptic", length=stage1["steps"] * config["batch_size"], seed=seed)
        cfg = TrainConfig(
            steps=stage1["steps"],
            batch_size=config["batch_size"],
            lr=stage1["lr"],
            weight_decay=stage1["weight_decay"],
            warmup_steps=stage1["warmup_steps"],
            grad_clip=stage1["grad_clip"],
            seed=seed,
            out_dir=str(folder),
            save_every=max(stage1["steps"] // 4, 1),
            progress=False,
            device="cpu",
            log_every=20,
        )
        result = train(seg, data, cfg, resume="auto")
        return {"final_loss": result.history[-1]["loss"] if result.history else None}

    _cached(folder, config, fit)
    return folder / FINAL_WEIGHTS


def pading(experiment: Experiment, variant: Variant, seed: int, job_dir: Path) -> dict[str, Any]:
    """PADing on the shapes world's zero-shot split. ``recipe_kwargs``: ``stage1`` (steps, lr, weight_decay,
    warmup_steps, grad_clip of the seen-only Mask2Former), ``classifier_lr`` (SGD on ``new_fc``) and ``stage2``
    (False: evaluate the stage-1 classifier itself). Stage 2 runs ``budget.steps`` iterations of ``batch_size``
    images, generator lr ``budget.lr`` with ``budget.warmup_steps`` of warm-up, from the seed's stage-1 checkpoint.

    The entry holds mIoU (semantic), PQ / SQ / RQ (panoptic) and mask AP50 (instance, things) over the seen
    classes, the unseen ones and their harmonic mean, on validation images with every class.
    """
    from ..data.shapes import zero_shot_config
    from ..engine.recipes.pading import Stage2Config, evaluate_zero_shot, seen_only_dataset, train_stage2

    kwargs = dict(variant.recipe_kwargs)
    b = experiment.budget
    world = zero_shot_config(image_size=b.image_size)
    stage1 = _pading_stage1(experiment, kwargs, seed, job_dir.parent)
    torch.manual_seed(seed)
    model = create_model(variant.model, **variant.model_kwargs)
    model.load_stage1(stage1)
    entry: dict[str, Any] = {"stage1": stage1.as_posix()}
    start = time.perf_counter()
    if kwargs.get("stage2", True):
        cfg = Stage2Config(
            steps=b.steps,
            batch_size=b.batch_size,
            generator_lr=b.lr,
            warmup_steps=b.warmup_steps,
            classifier_lr=kwargs["classifier_lr"],
            seed=seed,
            log_every=10,
        )
        # Stage 2 is short and not checkpointed: an interrupted job runs it again from the stage-1 weights.
        result = train_stage2(
            model, seen_only_dataset(world, "panoptic", length=b.steps * b.batch_size, seed=seed), cfg
        )
        entry.update(last_losses=result.history[-1], skipped_generator_steps=result.skipped_generator_steps)
    entry["stage2_s"] = round(time.perf_counter() - start, 1)
    val = ShapesDataset("val", length=b.val_length, config=world, seed=0)
    metrics = evaluate_zero_shot(model, val, batch_size=16)
    flat = {
        key: metrics[task][key]
        for task in ("semantic", "panoptic", "instance")
        for key in metrics[task]
        if key in PADING_METRICS
    }
    return {**flat, "IoU": _per_class(world.class_names, metrics["semantic"]["IoU"]), **entry}


RECIPES: dict[str, Callable[[Experiment, Variant, int, Path], dict[str, Any]]] = {
    "supervised": supervised,
    "semi": semi_supervised,
    "gss": gss,
    "gss_roundtrip": gss_roundtrip,
    "pading": pading,
    "wsss": weakly_supervised,
}


def run_job(experiment: Experiment, variant: Variant, seed: int, job_dir: Path) -> dict[str, Any]:
    try:
        recipe = RECIPES[variant.recipe]
    except KeyError:
        raise ValueError(
            f"variant {variant.name!r} names recipe {variant.recipe!r}; known: {sorted(RECIPES)}"
        ) from None
    return recipe(experiment, variant, seed, job_dir)
