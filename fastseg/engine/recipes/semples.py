"""SemPLeS training runs, CAM inference and pseudo masks (spec D.1-D.6), on the fastseg trainer.

Stages (each its own run folder, each resumable from its last checkpoint with ``resume="auto"``):

0. `train_weaktr`: WeakTr phase 1 (multilabel soft-margin on class tokens, coarse CAM, fine CAM), whole model.
1. `run_segment_label_matching` (a): restart from the WeakTr weights, train CAM head + AAF with L_a (delta 0.1).
2. `run_prompt_learning` (b): the CAM model of (a) frozen; train the K background prompts with L_b (delta 1e-4).
3. `run_prompt_refinement` (c): restart from the **WeakTr** weights (not from (a)), prompts of (b) frozen; L_c.
4. `multiscale_cams` / `sweep_threshold` / `evaluate_cams` / `write_pseudo_masks`: multi-scale + flip fine CAMs
   of the positive classes, per-class min-max, a constant background score t, argmax; optional dense CRF.

Only image-level labels reach training (`WeakShapes` training sets carry no masks). Ground-truth masks are read
only by the evaluation and the official threshold sweep, which are reported apart from the fixed threshold.

Hyper-parameters follow spec D.5 where they transfer: AdamW (eps 1e-8, weight decay 0.03, also on the prompts),
the linear lr scaling ``lr = base_lr * batch / 512`` with base 5.12e-4 for (a) / (c) and 0.1 for (b), lambda_b 2.4,
lambda_p 0.02, lambda_r 0.05, prompt length 30, seed 504. Differences (stated in every run's ``run.json``): the
fastseg trainer's poly schedule instead of timm's cosine, step budgets instead of 60 epochs, no AMP on the CPU, a
batch-level augmentation (random resized crop of area `CROP_SCALE`, flip, colour jitter, erasing for (a) / (c); crop +
flip for (b)) instead of timm's RandAugment pipeline, and no per-epoch checkpoint selection on ground truth (the last
weights are kept; the GT-selected *threshold* is reported beside the fixed one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ... import checkpoint as ckpt
from ...data.pseudo import META_FILE, mask_file_name
from ...data.shapes import MEAN, STD
from ...data.weak import WeakShapes, weak_class_names
from ...metrics import ConfusionMatrix
from ...models.clip import FrozenCLIP
from ...models.plain_cam import PlainCAM
from ...models.semples import SemPLeSRun
from ...models.weaktr import DEFAULT_BACKGROUND_THRESHOLD, WeakTr
from ...registry import create_model
from ..trainer import TrainConfig, TrainResult, train

__all__ = [
    "BASE_LR",
    "CAM_SOURCES",
    "RunOptions",
    "augment_batch",
    "build_run",
    "cams_to_labels",
    "classification_map",
    "cooccurrence_leakage",
    "crf_available",
    "evaluate_cams",
    "load_cam_model",
    "load_plain_cam",
    "multiscale_cams",
    "run_prompt_learning",
    "run_prompt_refinement",
    "run_segment_label_matching",
    "sweep_threshold",
    "train_plain_cam",
    "train_weaktr",
    "write_pseudo_masks",
]

# Base learning rates, scaled by batch / 512 (timm's linear rule, as upstream): runs (a), (b), (c) from spec D.5 (VOC);
# WeakTr phase 1 from WeakTr's docs/Training.md (VOC, ``--lr 6e-4``).
BASE_LR = {"weaktr": 6e-4, "a": 5.12e-4, "b": 0.1, "c": 5.12e-4}
SEED = 504
SWEEP_START, SWEEP_STEP = 0.40, 0.01
CAM_SOURCES = ("fine", "coarse", "fused", "cross")  # the maps `multiscale_cams` can read from `forward_cams`
# Area range of the random-resized crop. Our adaptation: upstream uses timm's ImageNet crop on VOC images, whose objects
# are large; on the 64 x 64 shapes world (shapes cover 7.7 % of the pixels) an area floor of 0.5 cuts every labelled
# shape out of the crop in 6.5 % of the (image, class) pairs, which then train on a label the image no longer shows.
# The floor 0.8 leaves 1.3 % (``tests/engine/test_semples_recipes.py`` holds it under 3 %).
CROP_SCALE = (0.8, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation (the global torch RNG, which the trainer seeds and restores on resume)
# ----------------------------------------------------------------------------------------------------------------
def augment_batch(
    images: torch.Tensor, colour: bool, crop_scale: tuple[float, float] = CROP_SCALE, erase_prob: float = 0.25
) -> torch.Tensor:
    """Per image: random resized crop (area ``crop_scale``, aspect 3/4..4/3) back to the input size and a
    horizontal flip; with ``colour`` also brightness / contrast / saturation jitter 0.4 and random erasing. The
    default area range is `CROP_SCALE` (milder than upstream's, so that the image-level labels stay true)."""
    batch, _, height, width = images.shape
    out = []
    mean = torch.tensor(MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(3, 1, 1)
    for x in images:
        area = float(torch.empty(()).uniform_(*crop_scale)) * height * width
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3))))
        h = min(height, max(4, round(math.sqrt(area / ratio))))
        w = min(width, max(4, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        x = F.interpolate(
            x[None, :, top : top + h, left : left + w], size=(height, width), mode="bilinear", align_corners=False
        )[0]
        if bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        if colour:
            rgb = x * std + mean
            jitter = 1 + (torch.rand(3) * 0.8 - 0.4)
            rgb = rgb * jitter[0]
            rgb = (rgb - rgb.mean()) * jitter[1] + rgb.mean()
            grey = rgb.mean(0, keepdim=True)
            rgb = (rgb - grey) * jitter[2] + grey
            x = (rgb.clamp(0, 1) - mean) / std
            if bool(torch.rand(()) < erase_prob):
                eh, ew = int(torch.randint(4, height // 2 + 1, ())), int(torch.randint(4, width // 2 + 1, ()))
                ey, ex = int(torch.randint(0, height - eh + 1, ())), int(torch.randint(0, width - ew + 1, ()))
                x = x.clone()
                x[:, ey : ey + eh, ex : ex + ew] = torch.randn(3, eh, ew)
        out.append(x)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------
def _scaled_lr(stage: str, batch_size: int, lr: float | None) -> float:
    return lr if lr is not None else BASE_LR[stage] * batch_size / 512


def _train_config(
    out_dir: str | os.PathLike,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    save_every: int,
    device: str,
    weight_decay: float = 0.03,
) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=0,
        poly_power=0.9,
        out_dir=str(out_dir),
        seed=seed,
        save_every=save_every,
        device=device,
        progress=False,
        log_every=max(1, min(10, steps)),
    )


def _write_run_json(out_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    path = Path(out_dir) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))


def train_weaktr(
    out_dir: str | os.PathLike,
    model_name: str = "weaktr_shapes_tiny",
    steps: int = 600,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = SEED,
    train_length: int = 4096,
    backbone_checkpoint: str | os.PathLike | None = None,
    resume: str | None = "auto",
    save_every: int = 100,
    device: str = "auto",
    impl: str = "auto",
    stop_at_step: int | None = None,
    coarse_only: bool = False,
) -> TrainResult:
    """WeakTr phase 1 on the shapes world's image-level labels; writes ``<out_dir>/model.safetensors``.

    ``backbone_checkpoint``: a DeiT or an open_clip checkpoint (`WeakTr.load_deit_checkpoint`). ``coarse_only``
    trains the same network as a plain GAP classifier on its CAM head alone (the plain-CAM ablation: no class-token
    or fine-CAM loss)."""
    model = create_model(model_name, backbone_checkpoint=backbone_checkpoint, impl=impl)
    train_set = WeakShapes("train", length=train_length, seed=0)
    lr = _scaled_lr("weaktr", batch_size, lr)
    _write_run_json(
        out_dir,
        {
            "stage": "weaktr_coarse_only" if coarse_only else "weaktr",
            "model": model_name,
            "backbone_checkpoint": None if backbone_checkpoint is None else str(backbone_checkpoint),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "train_length": train_length,
            "crop_scale": list(CROP_SCALE),
        },
    )

    def loss_fn(m: WeakTr, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = augment_batch(batch["image"], colour=True)
        if coarse_only:
            logits = m.forward_cams(images)["coarse_logits"]
            return {"loss": F.multilabel_soft_margin_loss(logits, m.image_labels(batch))}
        return m.loss({"image": images, "image_labels": batch["image_labels"]})

    cfg = _train_config(out_dir, steps, batch_size, lr, seed, save_every, device)
    return train(model, train_set, cfg, resume=resume, loss_fn=loss_fn, stop_at_step=stop_at_step)


def train_plain_cam(
    out_dir: str | os.PathLike,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = SEED,
    train_length: int = 4096,
    backbone: str = "resnet18",
    resume: str | None = "auto",
    save_every: int = 100,
    device: str = "auto",
    stop_at_step: int | None = None,
) -> TrainResult:
    """The plain CAM baseline (`fastseg.models.plain_cam.PlainCAM`) on image-level labels, with WeakTr's
    augmentation; writes ``<out_dir>/model.safetensors``."""
    model = PlainCAM(len(weak_class_names()) - 1, backbone=backbone)
    _write_run_json(
        out_dir,
        {
            "stage": "plain_cam",
            "backbone": backbone,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "train_length": train_length,
            "crop_scale": list(CROP_SCALE),
        },
    )

    def loss_fn(m: PlainCAM, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return m.loss({"image": augment_batch(batch["image"], colour=True), "image_labels": batch["image_labels"]})

    cfg = _train_config(out_dir, steps, batch_size, lr, seed, save_every, device)
    train_set = WeakShapes("train", length=train_length, seed=0)
    return train(model, train_set, cfg, resume=resume, loss_fn=loss_fn, stop_at_step=stop_at_step)


def load_plain_cam(path: str | os.PathLike, backbone: str = "resnet18") -> PlainCAM:
    """A `PlainCAM` from the ``model.safetensors`` of `train_plain_cam`."""
    model = PlainCAM(len(weak_class_names()) - 1, backbone=backbone)
    ckpt.load_weights(model, path, strict=True)
    return model


def load_cam_model(path: str | os.PathLike, model_name: str = "weaktr_shapes_tiny", impl: str = "auto") -> WeakTr:
    """A WeakTr from a phase-1 checkpoint, or the CAM model inside a SemPLeS run checkpoint (keys ``cam_model.*``)."""
    state = ckpt.load_state_dict(path)
    if any(k.startswith("cam_model.") for k in state):
        state = {k[len("cam_model.") :]: v for k, v in state.items() if k.startswith("cam_model.")}
    names = ckpt.read_metadata(path).get("class_names")
    kwargs: dict[str, Any] = {"impl": impl}
    if names:
        kwargs["class_names"] = tuple(json.loads(names))
    model = create_model(model_name, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold weights of {model_name}: {str(err).splitlines()[0]}") from None
    return model


def build_run(
    cam_checkpoint: str | os.PathLike,
    clip: FrozenCLIP,
    model_name: str = "weaktr_shapes_tiny",
    class_names: Sequence[str] | None = None,
    impl: str = "auto",
    **lambdas: float,
) -> SemPLeSRun:
    """A `SemPLeSRun` whose CAM model comes from ``cam_checkpoint``; the prompt class names default to the CAM
    model's foreground class names (``ValueError`` when given names do not match them)."""
    cam_model = load_cam_model(cam_checkpoint, model_name, impl)
    names = tuple(class_names) if class_names is not None else tuple(cam_model.pretrained_cfg.class_names[1:])
    return SemPLeSRun(cam_model, clip, names, impl=impl, **lambdas)


@dataclass(frozen=True)
class RunOptions:
    """What runs (a), (b) and (c) share: the training budget, where it runs, the CAM model and the loss weights.

    ``lr=None`` means the spec's base lr of the run x ``batch_size`` / 512 (`BASE_LR`). ``resume``: ``"auto"`` (the
    run folder's last checkpoint), a file, or ``None``. ``class_names``: the prompts' classes (default: the CAM
    model's foreground classes). ``stop_at_step`` ends the run early, as a crash would (tests). ``lambda_*`` and
    ``prompt_length`` go to `SemPLeSRun` (spec D.4 / D.5 VOC values)."""

    steps: int = 300
    batch_size: int = 32
    lr: float | None = None
    seed: int = SEED
    train_length: int = 4096
    resume: str | None = "auto"
    save_every: int = 50
    device: str = "auto"
    model_name: str = "weaktr_shapes_tiny"
    class_names: Sequence[str] | None = None
    impl: str = "auto"
    stop_at_step: int | None = None
    lambda_b: float = 2.4
    lambda_p: float = 0.02
    lambda_r: float = 0.05
    prompt_length: int = 30

    def build_run(self, cam_checkpoint: str | os.PathLike, clip: FrozenCLIP) -> SemPLeSRun:
        """`build_run` with these options' CAM model, class names and loss weights."""
        return build_run(
            cam_checkpoint,
            clip,
            self.model_name,
            self.class_names,
            self.impl,
            lambda_b=self.lambda_b,
            lambda_p=self.lambda_p,
            lambda_r=self.lambda_r,
            prompt_length=self.prompt_length,
        )


def _stage(
    stage: str, run: SemPLeSRun, out_dir: str | os.PathLike, options: RunOptions, extra: dict[str, Any]
) -> TrainResult:
    """Freeze per stage, then the fastseg trainer with the stage's loss and parameter groups."""
    for p in run.parameters():
        p.requires_grad_(False)
    trainable = list(run.prompt_learner.parameters()) if stage == "b" else run.cam_model.cam_parameters()
    for p in trainable:
        p.requires_grad_(True)
    lr = _scaled_lr(stage, options.batch_size, options.lr)
    loss_method = {"a": run.loss_a, "b": run.loss_b, "c": run.loss_c}[stage]
    colour = stage != "b"  # run (b): crop + flip only (spec D.5)

    def loss_fn(m: SemPLeSRun, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return loss_method(augment_batch(batch["image"], colour=colour), batch["image_labels"])

    def param_groups(m: SemPLeSRun, cfg: TrainConfig) -> list[dict[str, Any]]:
        decay = [p for p in trainable if p.ndim >= 2 or stage == "b"]  # the prompts are decayed too (D.10)
        rest = [p for p in trainable if not (p.ndim >= 2 or stage == "b")]
        return [
            g
            for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]
        ]

    _write_run_json(
        out_dir,
        {
            "stage": stage,
            "steps": options.steps,
            "batch_size": options.batch_size,
            "lr": lr,
            "seed": options.seed,
            "train_length": options.train_length,
            "crop_scale": list(CROP_SCALE),
            "clip": run.clip.config_name,
            "class_names": list(run.class_names),
            "lambda_b": run.lambda_b,
            "lambda_p": run.lambda_p,
            "lambda_r": run.lambda_r,
            **extra,
        },
    )
    cfg = _train_config(
        out_dir, options.steps, options.batch_size, lr, options.seed, options.save_every, options.device
    )
    train_set = WeakShapes("train", length=options.train_length, seed=0)
    return train(
        run,
        train_set,
        cfg,
        resume=options.resume,
        loss_fn=loss_fn,
        param_groups=param_groups,
        stop_at_step=options.stop_at_step,
    )


def run_segment_label_matching(
    weaktr_checkpoint: str | os.PathLike,
    clip: FrozenCLIP,
    out_dir: str | os.PathLike,
    options: RunOptions = RunOptions(),
) -> TrainResult:
    """Run (a): CAM head + AAF trained with L_a from the WeakTr weights."""
    run = options.build_run(weaktr_checkpoint, clip)
    return _stage("a", run, out_dir, options, {"init": str(weaktr_checkpoint)})


def run_prompt_learning(
    stage_a_checkpoint: str | os.PathLike,
    clip: FrozenCLIP,
    out_dir: str | os.PathLike,
    options: RunOptions = RunOptions(),
) -> TrainResult:
    """Run (b): the background prompts trained with L_b; the CAM model of run (a) frozen."""
    run = options.build_run(stage_a_checkpoint, clip)
    return _stage("b", run, out_dir, options, {"init": str(stage_a_checkpoint)})


def load_prompts(run: SemPLeSRun, path: str | os.PathLike) -> None:
    """Copy the prompts of a run-(b) checkpoint into ``run``; ``ValueError`` when its classes differ."""
    state = ckpt.load_state_dict(path)
    key = "prompt_learner.prompts"
    if key not in state:
        raise ValueError(f"{path} holds no learned prompts (key {key!r}); pass the output of run (b)")
    names = ckpt.read_metadata(path).get("class_names")
    saved = tuple(json.loads(names))[1:] if names else None
    prompts = state[key]
    if prompts.shape[0] != len(run.class_names) or (saved is not None and saved != run.class_names):
        raise ValueError(
            f"the prompts in {path} were learned for {prompts.shape[0]} classes {saved} but this run "
            f"has {len(run.class_names)} classes {list(run.class_names)}"
        )
    if prompts.shape[1:] != run.prompt_learner.prompts.shape[1:]:
        raise ValueError(
            f"the prompts in {path} have shape {tuple(prompts.shape)}; this run's CLIP / prompt length "
            f"needs {tuple(run.prompt_learner.prompts.shape)}"
        )
    with torch.no_grad():
        run.prompt_learner.prompts.copy_(prompts)


def run_prompt_refinement(
    weaktr_checkpoint: str | os.PathLike,
    prompts_checkpoint: str | os.PathLike,
    clip: FrozenCLIP,
    out_dir: str | os.PathLike,
    options: RunOptions = RunOptions(),
) -> TrainResult:
    """Run (c): restart from the WeakTr weights (not run (a)); prompts of run (b) frozen; L_c."""
    run = options.build_run(weaktr_checkpoint, clip)
    load_prompts(run, prompts_checkpoint)
    return _stage("c", run, out_dir, options, {"init": str(weaktr_checkpoint), "prompts": str(prompts_checkpoint)})


# ----------------------------------------------------------------------------------------------------------------
# CAM inference and pseudo masks
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def multiscale_cams(
    model: WeakTr,
    images: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[float] = (1.0, 1.2),
    flip: bool = True,
    cam: str = "fine",
) -> torch.Tensor:
    """``(B, K, H, W)`` CAMs in [0, 1]: fine CAMs at every scale (+ flip), upsampled to the image, summed, kept for
    the positive classes only, and min-max normalised per (image, class) (spec D.6; WeakTr's 1e-8 denominator).
    ``cam="coarse"`` uses the CAM head's map instead (the plain GAP-classifier CAM baseline); ``"cross"`` (the class
    tokens' attention to the patches) and ``"fused"`` (cross x ReLU(coarse), before the patch-affinity propagation)
    are WeakTr's intermediate maps, for diagnosis."""
    if cam not in CAM_SOURCES:
        raise ValueError(f"cam must be one of {CAM_SOURCES}, got {cam!r}")
    model.eval()
    batch, _, height, width = images.shape
    p = model.patch_size
    total = images.new_zeros(batch, model.num_cam_classes, height, width)
    for scale in scales:
        size = (max(p, round(height * scale / p) * p), max(p, round(width * scale / p) * p))
        scaled = (
            F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            if size != (height, width)
            else images
        )
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            fine = F.relu(model.forward_cams(x)[cam])
            fine = F.interpolate(fine, size=(height, width), mode="bilinear", align_corners=False)
            total += fine.flip(-1) if flipped else fine
    total = total * (labels > 0).to(total.dtype)[..., None, None]
    low = total.flatten(2).amin(-1)[..., None, None]
    high = total.flatten(2).amax(-1)[..., None, None]
    return ((total - low) / (high - low + 1e-8)) * (labels > 0).to(total.dtype)[..., None, None]


def cams_to_labels(cams: torch.Tensor, threshold: float) -> torch.Tensor:
    """Prepend the constant background score ``threshold``; argmax -> ``(B, H, W)`` ids (0 = background)."""
    background = torch.full_like(cams[:, :1], threshold)
    return torch.cat([background, cams], 1).argmax(1)


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(
    image_rgb: np.ndarray, labels: np.ndarray, num_classes: int, gt_prob: float = 0.7, iterations: int = 10
) -> np.ndarray:
    """Dense CRF on a label map (spec D.6, VOC pairwise settings); needs ``pydensecrf``."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    height, width = labels.shape
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary_from_labels(labels, num_classes, gt_prob=gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=4, compat=3)
    crf.addPairwiseBilateral(sxy=83, srgb=5, rgbim=np.ascontiguousarray(image_rgb), compat=3)
    return np.argmax(np.array(crf.inference(iterations)).reshape(num_classes, height, width), 0).astype(np.uint8)


def _resolve_crf(crf: str) -> bool:
    if crf not in ("auto", "on", "off"):
        raise ValueError(f"crf must be 'auto', 'on' or 'off', got {crf!r}")
    if crf == "off":
        return False
    if crf_available():
        return True
    message = (
        "dense CRF skipped: no CRF package is importable (`pip install 'fastseg[crf]'` builds pydensecrf2, "
        "which provides pydensecrf.densecrf); pseudo masks are the thresholded CAMs"
    )
    if crf == "on":
        raise ValueError(message.replace("skipped", "requested but unavailable"))
    print(f"[fastseg semples] {message}")
    return False


def _dataset_cams(
    model: WeakTr,
    dataset: WeakShapes,
    batch_size: int,
    scales: Sequence[float],
    device: torch.device,
    cam: str = "fine",
) -> Callable[[], Any]:
    """Yields ``(cams, labels_gt or None, images, indices)`` per batch."""

    def generate():
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            images = torch.stack([s["image"] for s in samples]).to(device)
            labels = torch.stack([s["image_labels"] for s in samples]).to(device)
            masks = torch.stack([s["mask"] for s in samples]) if "mask" in samples[0] else None
            yield (
                multiscale_cams(model, images, labels, scales, cam=cam),
                masks,
                images,
                [s["index"] for s in samples],
            )

    return generate


def evaluate_cams(
    model: WeakTr,
    dataset: WeakShapes,
    thresholds: Sequence[float],
    batch_size: int = 32,
    scales: Sequence[float] = (1.0, 1.2),
    device: str | torch.device = "cpu",
    cam: str = "fine",
) -> dict[float, dict]:
    """mIoU (and per-class IoU) of the CAM pseudo labels against the dataset's ground truth, per threshold."""
    if not dataset.with_masks:
        raise ValueError("evaluate_cams needs ground-truth masks: build the dataset with with_masks=True")
    device = torch.device(device)
    model.to(device)
    matrices = {t: ConfusionMatrix(dataset.num_classes, dataset.ignore_index) for t in thresholds}
    for cams, masks, _, _ in _dataset_cams(model, dataset, batch_size, scales, device, cam)():
        for t, cm in matrices.items():
            cm.update(cams_to_labels(cams, t).cpu(), masks)
    return {t: cm.compute() for t, cm in matrices.items()}


@torch.no_grad()
def classification_map(model: WeakTr | PlainCAM, dataset: WeakShapes, key: str, batch_size: int = 64) -> dict:
    """How well the CAM model classifies: mean over classes of the average precision of ``forward_cams()[key]``
    (e.g. ``"coarse_logits"``, ``"cls_logits"``) against the image-level labels, and the per-label accuracy at
    logit 0 beside that of always answering "absent" (the trivial level of a sparse multi-label task)."""
    model.eval()
    scores, labels = [], []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        scores.append(model.forward_cams(torch.stack([s["image"] for s in samples]))[key])
        labels.append(torch.stack([s["image_labels"] for s in samples]) > 0)
    score, label = torch.cat(scores), torch.cat(labels)
    precisions = []
    for k in range(label.shape[1]):
        if not bool(label[:, k].any()):
            continue
        hits = label[score[:, k].argsort(descending=True), k].float()
        precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        precisions.append(float((precision_at * hits).sum() / hits.sum()))
    return {
        "mAP": sum(precisions) / len(precisions),
        "accuracy": float(((score > 0) == label).float().mean()),
        "accuracy_all_absent": float((~label).float().mean()),
    }


@torch.no_grad()
def cooccurrence_leakage(
    model: WeakTr | PlainCAM,
    dataset: WeakShapes,
    threshold: float,
    cam: str = "fine",
    scales: Sequence[float] = (1.0, 1.2),
) -> list[float | None]:
    """Per foreground class: the share of its preferred texture's pixels (in the images that hold the class) that the
    pseudo mask at ``threshold`` labels as the class: the spurious co-occurring background SemPLeS' prompts should
    keep out (lower is better; ``None`` for a class that never occurs). ``dataset`` must carry its masks."""
    if not dataset.with_masks:
        raise ValueError("cooccurrence_leakage needs ground-truth masks: build the dataset with with_masks=True")
    config = dataset.config
    stuff = len(config.stuff_classes)
    preferred = config.preferred_stuff_ids
    hits, totals = [0] * (dataset.num_classes - 1), [0] * (dataset.num_classes - 1)
    for i in range(len(dataset)):
        sample = dataset[i]
        world_mask = dataset.world[sample["index"]]["mask"]
        labels = sample["image_labels"][None]
        pred = cams_to_labels(multiscale_cams(model, sample["image"][None], labels, scales, cam=cam), threshold)[0]
        for k in labels[0].nonzero().flatten().tolist():
            texture = world_mask == preferred[stuff + k]
            totals[k] += int(texture.sum())
            hits[k] += int((pred[texture] == k + 1).sum())
    return [h / t if t else None for h, t in zip(hits, totals)]


def sweep_threshold(
    model: WeakTr,
    dataset: WeakShapes,
    start: float = SWEEP_START,
    step: float = SWEEP_STEP,
    max_threshold: float = 0.95,
    **kw: Any,
) -> dict[str, Any]:
    """The official protocol (peeks at train ground truth): raise t from ``start`` by ``step`` and stop at the
    first drop in mIoU; returns the best t, its metrics, the curve and the metrics at every grid threshold (``all``,
    keyed by the threshold rounded to 4 digits)."""
    grid = [round(start + i * step, 4) for i in range(int(round((max_threshold - start) / step)) + 1)]
    results = evaluate_cams(model, dataset, grid, **kw)
    curve, best_t = [], grid[0]
    for t in grid:
        curve.append((t, results[t]["mIoU"]))
        if results[t]["mIoU"] < results[best_t]["mIoU"]:
            break
        best_t = t
    return {"threshold": best_t, "metrics": results[best_t], "curve": curve, "all": results}


def write_pseudo_masks(
    model: WeakTr,
    out_dir: str | os.PathLike,
    split: str = "train",
    length: int = 4096,
    seed: int = 0,
    threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
    crf: str = "auto",
    batch_size: int = 32,
    scales: Sequence[float] = (1.0, 1.2),
    device: str | torch.device = "cpu",
    cam: str = "fine",
) -> Path:
    """Write one label PNG per image (uint8 WSSS ids) and ``meta.json``; returns the folder.

    The folder is written completely into ``<out_dir>.partial`` and renamed at the end, so an existing folder is
    never half overwritten; an existing ``out_dir`` is an error.
    """
    from ...data.visualize import save_png

    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"{out} exists; choose a new folder (pseudo masks are never overwritten)")
    use_crf = _resolve_crf(crf)
    dataset = WeakShapes(split, length=length, seed=seed)
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model.to(device)
    mean, std = np.asarray(MEAN, np.float32)[:, None, None], np.asarray(STD, np.float32)[:, None, None]
    indices = []
    for cams, _, images, batch_indices in _dataset_cams(model, dataset, batch_size, scales, device, cam)():
        labels = cams_to_labels(cams, threshold).to(torch.uint8).cpu().numpy()
        for lab, img, index in zip(labels, images.cpu().numpy(), batch_indices):
            if use_crf:
                rgb = (np.clip(img * std + mean, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
                lab = dense_crf(rgb, lab, dataset.num_classes)
            if index not in indices:  # WeakShapes may map two requests to the same image
                save_png(lab, partial / mask_file_name(index))
                indices.append(index)
    config = dataset.config
    meta = {
        "split": split,
        "length": length,
        "seed": seed,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "class_names": list(dataset.class_names),
        "num_classes": dataset.num_classes,
        "ignore_index": dataset.ignore_index,
        "indices": indices,
        "threshold": threshold,
        "crf": use_crf,
        "scales": list(scales),
        "cam": cam,
        "model": getattr(model, "model_name", None),
    }
    (partial / META_FILE).write_text(json.dumps(meta, indent=2))
    partial.rename(out)
    return out
