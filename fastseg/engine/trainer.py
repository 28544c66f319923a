"""The training loop every fastseg method uses.

What it does per step: draw the batch that ``(seed, step, rank)`` designates, run ``loss_fn(model, batch)``
(``model.loss(batch)`` by default) under optional autocast, assert the total loss is finite, back-propagate
(through a ``GradScaler`` for fp16), clip the gradient norm, step the optimizer (AdamW or SGD) and the poly
schedule with linear warm-up, log to ``<out_dir>/metrics.jsonl`` and a tqdm bar, evaluate and checkpoint.

Exact resume (tested on CPU): the checkpoint holds the weights (``last.safetensors``, bit-exact) and
``last_state.pt`` with the optimizer, scheduler, scaler, step and every process's torch / CUDA / Python / NumPy
RNG state, all as tensors and plain scalars so it loads with ``torch.load(weights_only=True)``. The data order is
a function of ``(seed, step)`` (:mod:`fastseg.engine.distributed`), and the RNG is restored *after* seeding, so
``N`` steps + save + load into fresh objects + ``N`` steps gives the same losses bit for bit as ``2N`` straight.
Limits: DataLoader worker processes re-seed from ``(seed, start_step)``, so randomness drawn *inside workers*
(``num_workers > 0`` with random augmentations) is only reproducible from the same start step; use
``num_workers=0`` when exact resume of such pipelines matters. GPU kernels with atomics are only reproducible with
``deterministic=True``.

Multi-stage methods reuse this loop with their own ``loss_fn`` and ``param_groups`` (freeze parts by leaving them
out and setting ``requires_grad=False``; per-group ``"lr"`` entries are honoured and follow the same schedule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import checkpoint as ckpt
from ..version import __version__
from .distributed import (
    DistInfo,
    StepBatchSampler,
    barrier,
    init_distributed,
)
from .evaluate import batch_to_device, evaluate, model_cfg_value

__all__ = ["TrainConfig", "TrainResult", "default_param_groups", "poly_lr_factor", "train"]

LossFn = Callable[[nn.Module, dict[str, Any]], Mapping[str, torch.Tensor]]
ParamGroupsFn = Callable[[nn.Module, "TrainConfig"], Iterable[dict[str, Any]]]

LAST_WEIGHTS = "last.safetensors"
LAST_STATE = "last_state.pt"
BEST_WEIGHTS = "best.safetensors"
FINAL_WEIGHTS = "model.safetensors"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Hyper-parameters and plumbing of one training run.

    Attributes:
        steps: Total optimizer steps; the schedule spans exactly this many.
        batch_size: Samples per step **per process** (the global batch is ``batch_size * world_size``).
        lr: Peak learning rate (after warm-up). Param groups with their own ``"lr"`` keep it as their peak.
        weight_decay: Applied to weights with ``ndim >= 2``; biases and norm parameters get none.
        optimizer: ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum (ignored by AdamW).
        warmup_steps: Linear warm-up from ``lr / warmup_steps`` to ``lr``.
        poly_power: Poly decay ``(1 - progress) ** poly_power`` after warm-up (1.0 = linear, 0.0 = constant).
        min_lr_ratio: Floor of the decay as a fraction of ``lr``.
        grad_clip: Max global gradient L2 norm (``None`` = no clipping; the norm is still logged).
        amp: ``"none" | "bf16" | "fp16" | "auto"``; autocast on CUDA only (``"auto"`` = bf16 where supported).
            fp16 uses a ``GradScaler``. Asking for bf16 / fp16 on the CPU is an error.
        log_every: Steps between ``metrics.jsonl`` records (and progress-bar updates).
        eval_every: Steps between evaluations on ``val_set`` (0 = only at the end).
        save_every: Steps between ``last.safetensors`` / ``last_state.pt`` checkpoints (0 = only at the end).
        out_dir: Where metrics and checkpoints go; ``None`` writes nothing (no resume possible).
        seed: Seeds the data order and the global torch / Python / NumPy RNGs (plus the rank under DDP).
        num_workers: DataLoader workers (0 for bit-exact resume of random augmentations; see module docstring).
        device: ``"auto" | "cpu" | "cuda"`` (under DDP, ``cuda`` means ``cuda:LOCAL_RANK``).
        eval_batch_size: Batch size for evaluation (defaults to ``batch_size``).
        progress: Show a tqdm bar (only on rank 0 and only when stderr is a terminal).
        find_unused_parameters: Passed to DDP, for losses that leave some trainable parameters unused.
        deterministic: Run under ``torch.use_deterministic_algorithms(True)`` (restored afterwards).
        shuffle: Shuffle each epoch (a ``(seed, epoch)`` permutation); ``False`` walks the dataset in order.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_steps: int = 0
    poly_power: float = 0.9
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    amp: str = "none"
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    out_dir: str | None = "runs/train"
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    eval_batch_size: int | None = None
    progress: bool = True
    find_unused_parameters: bool = False
    deterministic: bool = False
    shuffle: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with an impossible value."""
        positive = {"steps": self.steps, "batch_size": self.batch_size, "log_every": self.log_every}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.amp not in ("none", "bf16", "fp16", "auto"):
            raise ValueError(f"TrainConfig.amp must be 'none', 'bf16', 'fp16' or 'auto', got {self.amp!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.poly_power < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"TrainConfig.poly_power must be >= 0 and min_lr_ratio in [0, 1]; got {self.poly_power!r}, "
                f"{self.min_lr_ratio!r}"
            )
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"TrainConfig.eval_batch_size must be >= 1 or None, got {self.eval_batch_size!r}")


@dataclass
class TrainResult:
    """What a :func:`train` call did.

    Attributes:
        history: One dict per step run by this call: ``step`` (1-based count of completed steps), ``loss``, the
            other scalar loss components, ``lr`` (first param group) and ``grad_norm`` where it was computed
            (every step with ``grad_clip``, else on logging steps). Rank-local values under DDP.
        final_metrics: Evaluation of the final weights on ``val_set`` (``None`` without one).
        best_metrics: The evaluation with the highest mIoU seen by this run (including resumed best).
        start_step / end_step: Steps already done when this call began / when it returned.
        out_dir, metrics_file, last_weights, last_state, best_weights, final_weights: Paths written (or ``None``).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, Any] | None = None
    best_metrics: dict[str, Any] | None = None
    start_step: int = 0
    end_step: int = 0
    out_dir: Path | None = None
    metrics_file: Path | None = None
    last_weights: Path | None = None
    last_state: Path | None = None
    best_weights: Path | None = None
    final_weights: Path | None = None

    @property
    def losses(self) -> list[float]:
        """The total loss of every step run by this call."""
        return [record["loss"] for record in self.history]


# --------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------------------------


def default_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weights (``ndim >= 2``) with weight decay, biases / norms without."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def poly_lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for the optimizer step with index ``step`` (0-based): warm-up, then poly decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - progress) ** cfg.poly_power


def _build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not groups or not any(len(list(group["params"])) for group in groups):
        raise ValueError("no trainable parameters: every parameter has requires_grad=False or param_groups is empty")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------------------------------------------
# RNG state as tensors and plain values (loadable with weights_only=True)
# --------------------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def _to_plain(value: Any) -> Any:
    return [_to_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _gather_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state on every rank (so rank 0 can save them all), in rank order."""
    mine = _rng_state()
    if info.world_size == 1:
        return [mine]
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a forward so DDP sees (and synchronises) the whole loss computation."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> Mapping[str, torch.Tensor]:
        return self.loss_fn(self.model, batch)


def _default_loss(model: nn.Module, batch: dict[str, Any]) -> Mapping[str, torch.Tensor]:
    return model.loss(batch)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # NaN / inf are not JSON
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    return value


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_json_safe(record), sort_keys=False) + "\n")


def _grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _check_batch(batch: Any, step: int, num_classes: int | None, ignore_index: int) -> None:
    """Clear errors for the two bad inputs a loss would otherwise report cryptically (or as a CUDA assert)."""
    if not isinstance(batch, Mapping) or "image" not in batch or "mask" not in batch:
        return
    image, mask = batch["image"], batch["mask"]
    if image.dim() != 4 or mask.dim() != 3 or image.shape[0] != mask.shape[0] or image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"step {step}: image batch {tuple(image.shape)} and mask batch {tuple(mask.shape)} do not fit; "
            f"expected (B, C, H, W) images and (B, H, W) masks of the same B, H, W"
        )
    if mask.is_floating_point():
        raise ValueError(f"step {step}: masks must hold integer class ids, got dtype {mask.dtype}")
    if num_classes is not None:
        labelled = mask[mask != ignore_index]
        if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= num_classes):
            bad = torch.unique(labelled[(labelled < 0) | (labelled >= num_classes)])
            raise ValueError(
                f"step {step}: mask label {int(bad[0])} is outside 0..{num_classes - 1} and is not the ignore "
                f"index {ignore_index} (offending values {bad[:8].tolist()}); does the dataset match the model's "
                f"num_classes={num_classes}?"
            )


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "none":
        return None
    if device.type != "cuda":
        if cfg.amp == "auto":
            return None
        raise ValueError(f"amp={cfg.amp!r} needs a CUDA device; training runs on {device}. Use amp='none'.")
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def _resolve_resume(resume: str | Path | None, out_dir: Path | None) -> Path | None:
    """Path of the training-state file to resume from, or ``None`` for a fresh run."""
    if resume is None:
        return None
    if str(resume) == "auto":
        if out_dir is None:
            raise ValueError("resume='auto' needs cfg.out_dir")
        candidate = out_dir / LAST_STATE
        return candidate if candidate.exists() else None
    path = Path(resume)
    if path.is_dir():
        path = path / LAST_STATE
    elif path.suffix == ".safetensors":
        path = path.with_name(f"{path.stem}_state.pt")
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint not found: '{path}'")
    return path


def _weights_metadata(model: nn.Module, step: int) -> dict[str, str]:
    metadata = {"step": str(step)}
    for key in ("architecture", "num_classes", "ignore_index"):
        value = model_cfg_value(model, key)
        if value is not None:
            metadata[key] = str(value)
    names = model_cfg_value(model, "class_names")
    if names is not None:
        metadata["class_names"] = json.dumps(list(names))
    if "architecture" not in metadata and isinstance(getattr(model, "model_name", None), str):
        metadata["architecture"] = model.model_name
    # Recipes mark what a checkpoint is (e.g. PADing's seen-only stage 1) through ``model.checkpoint_metadata``.
    metadata.update({str(k): str(v) for k, v in (getattr(model, "checkpoint_metadata", None) or {}).items()})
    return metadata


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    val_set: Dataset | None = None,
    resume: str | Path | None = None,
    loss_fn: LossFn | None = None,
    param_groups: ParamGroupsFn | Iterable[dict[str, Any]] | None = None,
    stop_at_step: int | None = None,
    on_step_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_set`` for ``cfg.steps`` optimizer steps.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised here (gloo on CPU, nccl on CUDA),
    the model is wrapped in DDP and every rank trains on its shard of each global batch; only rank 0 logs and
    writes files. All ranks must call ``train`` with the same arguments.

    Args:
        model: Follows the fastseg model contract; trained in place and also returned weights-wise via files.
        train_set: Map-style dataset of dicts (``"image"``, ``"mask"``, ...) collated by the default collate.
        cfg: Hyper-parameters (validated first).
        val_set: Evaluated every ``cfg.eval_every`` steps and at the end; the best mIoU is kept as
            ``best.safetensors``.
        resume: ``None`` (fresh), ``"auto"`` (``<out_dir>/last_state.pt`` if it exists, else fresh), a state file,
            a weights file (its ``<stem>_state.pt`` sibling is used) or a run folder.
        loss_fn: ``loss_fn(model, batch) -> {"loss": total, ...components}``; defaults to ``model.loss(batch)``.
        param_groups: Optimizer parameter groups (a list, or ``fn(model, cfg) -> list``) replacing
            :func:`default_param_groups`; groups may set their own ``"lr"`` / ``"weight_decay"``.
        stop_at_step: Return (after saving ``last`` checkpoints) once this many steps are done, as if interrupted;
            the schedule still spans ``cfg.steps``. Useful for time-sliced jobs and resume tests.
        on_step_end: Called on every rank as ``on_step_end(step, record)`` after each step (EMA updates, etc.).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: Bad config values, batches whose labels exceed ``num_classes``, image / mask size mismatch,
            a loss dict without ``"loss"``, amp requested on CPU.
        FloatingPointError: A non-finite loss or gradient norm; the message names the step.
        FileNotFoundError / fastseg.checkpoint.CheckpointError: An unusable resume checkpoint.
    """
    cfg.validate()
    info = init_distributed(cfg.device)
    device = info.device
    is_main = info.is_main
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = out_dir / METRICS_FILE if out_dir is not None else None
    autocast_dtype = _autocast_dtype(cfg, device)
    use_scaler = autocast_dtype == torch.float16
    loss_fn = loss_fn or _default_loss
    num_classes = model_cfg_value(model, "num_classes")
    ignore_index = model_cfg_value(model, "ignore_index", 255)
    end_step = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)

    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    # Seed first; a resumed run overwrites these states below (re-seeding after a restore breaks exact resume).
    _seed_everything(cfg.seed + info.rank)
    model.to(device)

    resume_path = _resolve_resume(resume, out_dir)
    state: dict[str, Any] | None = None
    start_step = 0
    if resume_path is not None:
        state = ckpt.load_training_state(resume_path)
        weights_path = resume_path.parent / state.get("weights_file", LAST_WEIGHTS)
        ckpt.load_weights(model, weights_path, strict=True)
        start_step = int(state["step"])
        weights_step = ckpt.read_metadata(weights_path).get("step")
        if weights_step is not None and int(weights_step) != start_step:
            raise ckpt.CheckpointError(
                f"'{weights_path}' holds weights of step {weights_step} but '{resume_path}' is the state of step "
                f"{start_step}; a save was interrupted between the two files. Resume from an earlier pair."
            )

    if param_groups is None:
        groups = default_param_groups(model, cfg)
    else:
        groups = list(param_groups(model, cfg) if callable(param_groups) else param_groups)
    optimizer = _build_optimizer(groups, cfg)
    # The lambda is a plain function, so the scheduler's state_dict stores None for it (weights_only-safe).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_lr_factor(step, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    best_miou = -math.inf
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        best_miou = float(state.get("best_miou", -math.inf))
        rng_states = state.get("rng", [])
        if len(rng_states) == info.world_size:
            _set_rng_state(rng_states[info.rank])
        else:
            # Saved with another world size: per-rank streams cannot be matched, derive them from (seed, step).
            _seed_everything(cfg.seed + info.rank + 7919 * start_step)

    loss_module: nn.Module = _LossModule(model, loss_fn)
    if info.world_size > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )

    sampler = StepBatchSampler(
        len(train_set), cfg.batch_size, cfg.seed, start_step, end_step, info.rank, info.world_size, cfg.shuffle
    )
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        # Explicit generator: without one, DataLoader draws a base seed from the global RNG, which would shift
        # the dropout / augmentation stream between a resumed and a straight run.
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + start_step),
        persistent_workers=False,
    )

    result = TrainResult(start_step=start_step, end_step=start_step, out_dir=out_dir, metrics_file=metrics_file)
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def run_eval(step: int) -> dict[str, Any]:
        metrics = evaluate(
            model,
            val_set,
            batch_size=eval_bs,
            device=device,
            progress=cfg.progress,
            num_workers=cfg.num_workers,
            amp="none" if autocast_dtype is None else ("bf16" if autocast_dtype == torch.bfloat16 else "fp16"),
        )
        record = {"step": step, "event": "eval"}
        record.update({f"val/{k}": v for k, v in metrics.items() if k != "table"})
        if is_main and metrics_file is not None:
            _append_jsonl(metrics_file, record)
        return metrics

    def keep_if_best(metrics: dict[str, Any], step: int) -> bool:
        """Remember an evaluation that beats the best mIoU so far and write its weights (rank 0); True if it did."""
        nonlocal best_miou
        if not metrics["mIoU"] > best_miou:
            return False
        best_miou = metrics["mIoU"]
        result.best_metrics = metrics
        if is_main and out_dir is not None:
            result.best_weights = ckpt.save_weights(model, out_dir / BEST_WEIGHTS, _weights_metadata(model, step))
        return True

    def save_last(step: int) -> None:
        rng = _gather_rng_states(info)  # collective: every rank takes part
        if is_main and out_dir is not None:
            # Weights first, then the state that names them: a crash in between leaves a detectable mismatch.
            ckpt.save_weights(model, out_dir / LAST_WEIGHTS, _weights_metadata(model, step))
            ckpt.save_training_state(
                out_dir / LAST_STATE,
                {
                    "step": step,
                    "weights_file": LAST_WEIGHTS,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if use_scaler else {},
                    "rng": rng,
                    "best_miou": best_miou,
                    "world_size": info.world_size,
                    "config": dataclasses.asdict(cfg),
                    "fastseg_version": __version__,
                },
            )
            result.last_weights, result.last_state = out_dir / LAST_WEIGHTS, out_dir / LAST_STATE
        barrier()

    if is_main and metrics_file is not None:
        _append_jsonl(
            metrics_file,
            {
                "event": "start",
                "step": start_step,
                "world_size": info.world_size,
                "device": str(device),
                "config": dataclasses.asdict(cfg),
                "resumed_from": str(resume_path) if resume_path else None,
            },
        )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="train",
        dynamic_ncols=True,
        disable=not (cfg.progress and is_main and sys.stderr.isatty()),
    )
    autocast = (lambda: torch.autocast("cuda", dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    model.train()
    step = start_step
    last_saved = last_evaluated = -1
    window_start, window_steps = time.perf_counter(), 0
    try:
        for batch in loader:
            _check_batch(batch, step, num_classes, ignore_index)
            batch = batch_to_device(batch, device)
            with autocast():
                out = loss_module(batch)
            if not isinstance(out, Mapping) or "loss" not in out:
                raise ValueError(
                    f"loss_fn must return a dict with a 'loss' entry, got {type(out).__name__}"
                    + (f" with keys {list(out)}" if isinstance(out, Mapping) else "")
                )
            loss = out["loss"]
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                parts = {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
                raise FloatingPointError(
                    f"non-finite loss {loss_value} at step {step} (0-based; components {parts}). Lower the lr, "
                    f"enable grad_clip, or check the inputs of this batch."
                )
            optimizer.zero_grad(set_to_none=True)
            if use_scaler:
                scaler.scale(loss).backward()
            else:
                loss.backward()

            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == end_step
            grad_norm: float | None = None
            if cfg.grad_clip is not None:
                if use_scaler:
                    scaler.unscale_(optimizer)
                try:
                    # With fp16 an inf gradient is routine (the scaler skips that step), so no error there.
                    norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip, error_if_nonfinite=not use_scaler)
                except RuntimeError as exc:
                    raise FloatingPointError(f"non-finite gradient norm at step {step} (0-based): {exc}") from exc
                grad_norm = float(norm)
            elif log_now:
                grad_norm = _grad_norm(trainable) / (scaler.get_scale() if use_scaler else 1.0)
            if use_scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            window_steps += 1

            record = {"step": step, "loss": loss_value, "lr": lr}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            for key, value in out.items():
                if key != "loss" and isinstance(value, torch.Tensor) and value.numel() == 1:
                    record[key] = float(value.detach())
            result.history.append(record)
            result.end_step = step
            if on_step_end is not None:
                on_step_end(step, record)

            if log_now:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / max(1, window_steps)
                log = dict(
                    record,
                    step_time_s=step_time,
                    samples_per_s=cfg.batch_size * info.world_size / step_time if step_time > 0 else None,
                )
                if use_scaler:
                    log["loss_scale"] = scaler.get_scale()
                if is_main and metrics_file is not None:
                    _append_jsonl(metrics_file, log)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)

            if val_set is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                last_evaluated = step
                if keep_if_best(run_eval(step), step):
                    barrier()  # the metrics are all-reduced, so every rank takes this branch together
                model.train()
            if cfg.save_every and step % cfg.save_every == 0 and step < end_step:
                save_last(step)
                last_saved = step
    finally:
        bar.close()
        if cfg.deterministic and not previous_deterministic:
            torch.use_deterministic_algorithms(False)

    if out_dir is not None and last_saved != step:
        save_last(step)
    if step >= cfg.steps:
        if val_set is not None and last_evaluated != step:
            result.final_metrics = run_eval(step)
            keep_if_best(result.final_metrics, step)
        if is_main and out_dir is not None:
            result.final_weights = ckpt.save_weights(model, out_dir / FINAL_WEIGHTS, _weights_metadata(model, step))
            _append_jsonl(
                metrics_file,
                {"event": "end", "step": step, "best_val_mIoU": best_miou if math.isfinite(best_miou) else None},
            )
        barrier()
    return result
