"""Evaluation loop: a dataset-level confusion matrix over ``model.predict``, reduced across DDP ranks.

Real datasets carry an ``eval_protocol`` (whole image, sliding window, multi-scale + flip; see
:mod:`fastseg.engine.inference`); such datasets, or an explicit ``protocol=``, are evaluated one image at a time at
the label's own size, since their images differ in size. The built-in shapes world keeps the batched
``model.predict`` path.

Each rank evaluates the strided shard ``rank, rank + world_size, ...`` of the dataset, so every sample is counted
exactly once, and the ``K x K`` matrices are summed with one ``all_reduce``; the result equals the single-process
one exactly (integer counts).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.transforms import EvalProtocol
from ..metrics.confusion import ConfusionMatrix
from .distributed import get_rank, get_world_size, resolve_device
from .inference import predict_image

__all__ = [
    "batch_to_device",
    "evaluate",
    "evaluate_confusion",
    "model_cfg_value",
    "recompute_bn_statistics",
    "resolve_protocol",
    "seen_unseen_miou",
    "split_batch",
]


def model_cfg_value(model: nn.Module, key: str, default: Any = None) -> Any:
    """Read ``key`` from ``model.pretrained_cfg`` whether it is a dataclass, an object or a dict."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(image, mask)`` from a collated batch: a dict with "image"/"mask" or an ``(image, mask)`` pair."""
    if isinstance(batch, Mapping):
        missing = [key for key in ("image", "mask") if key not in batch]
        if missing:
            raise ValueError(f"evaluation batches need 'image' and 'mask'; missing {missing}, got keys {list(batch)}")
        return batch["image"], batch["mask"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"a batch must be a dict with 'image' and 'mask' or an (image, mask) pair, got {type(batch).__name__}"
    )


def batch_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; other values are left as they are."""
    non_blocking = device.type == "cuda"
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {key: batch_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to_device(value, device) for value in batch)
    return batch


def _resolve_num_classes(model: nn.Module, num_classes: int | None) -> int:
    if num_classes is None:
        num_classes = model_cfg_value(model, "num_classes")
    if num_classes is None:
        raise ValueError("num_classes is not given and the model has no pretrained_cfg.num_classes")
    return int(num_classes)


def resolve_protocol(dataset: Dataset, protocol: EvalProtocol | str | None) -> EvalProtocol | None:
    """The protocol to evaluate ``dataset`` with: an explicit :class:`EvalProtocol`; a mode name (``"whole"``,
    ``"slide"``, ``"ms_flip"``) applied to the dataset's own ``eval_protocol``; or, for ``None``, the dataset's
    ``eval_protocol`` (``None`` for datasets without one, e.g. the shapes world: batched ``model.predict``)."""
    if isinstance(protocol, EvalProtocol):
        return protocol
    default = getattr(dataset, "eval_protocol", None)
    if protocol is None:
        return default
    if not isinstance(protocol, str):
        raise ValueError(f"protocol must be an EvalProtocol, a mode name or None, got {type(protocol).__name__}")  # noqa: TRY004
    return (default if default is not None else EvalProtocol()).with_mode(protocol)


def seen_unseen_miou(iou: Sequence[float], unseen: Sequence[int]) -> dict[str, float]:
    """Zero-shot summary (PADing / ZegFormer): mIoU over the seen and the unseen classes and their harmonic mean
    ``hIoU = 2 s u / (s + u)``; classes with nothing to measure (NaN IoU) are left out. Empty without unseen classes."""
    if not unseen:
        return {}
    unseen_set = {int(c) for c in unseen}

    def mean(ids: list[int]) -> float:
        values = [iou[c] for c in ids if not math.isnan(iou[c])]
        return sum(values) / len(values) if values else float("nan")

    seen = mean([c for c in range(len(iou)) if c not in unseen_set])
    novel = mean(sorted(unseen_set))
    harmonic = 2 * seen * novel / (seen + novel) if seen + novel > 0 else float("nan")
    return {"mIoU_seen": seen, "mIoU_unseen": novel, "hIoU": harmonic}


def _first(batch: list[Any]) -> Any:
    return batch[0]


@torch.inference_mode()
def evaluate_confusion(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    num_classes: int | None = None,
    ignore_index: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
    amp: str = "none",
    protocol: EvalProtocol | str | None = None,
) -> ConfusionMatrix:
    """Run ``model.predict`` over ``dataset`` and return the (all-reduced) confusion matrix.

    Arguments as in :func:`evaluate`. The model is put in eval mode and restored to its previous mode afterwards.
    """
    protocol = resolve_protocol(dataset, protocol)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_classes = _resolve_num_classes(model, num_classes)
    if ignore_index is None:
        ignore_index = model_cfg_value(model, "ignore_index", 255)
    rank, world_size = get_rank(), get_world_size()
    param = next(iter(model.parameters()), None)
    if device == "auto" and param is not None:
        target_device = param.device  # "auto" keeps the model where the caller put it
    else:
        local_rank = torch.cuda.current_device() if torch.cuda.is_available() else 0
        target_device = resolve_device(device, local_rank)
        model.to(target_device)

    shard = Subset(dataset, range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    # An explicit generator: DataLoader draws its base seed from the global RNG otherwise, which would shift
    # the training run's dropout / augmentation stream whenever evaluation runs in the middle of it.
    loader = DataLoader(
        shard,
        batch_size=batch_size if protocol is None else 1,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=target_device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
        collate_fn=None if protocol is None else _first,  # images differ in size: one at a time
    )
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=target_device)
    was_training = model.training
    model.eval()
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    try:
        from tqdm.auto import tqdm

        show = progress and rank == 0 and sys.stderr.isatty()
        for batch in tqdm(loader, desc="eval", disable=not show, leave=False):
            images, masks = split_batch(batch)
            if protocol is not None:
                images, masks = images[None], masks[None]
            images = images.to(target_device, non_blocking=True)
            masks = masks.to(target_device, non_blocking=True)
            autocast = (
                torch.autocast("cuda", dtype=autocast_dtype)
                if autocast_dtype is not None and target_device.type == "cuda"
                else contextlib.nullcontext()
            )
            with autocast:
                if protocol is None:
                    pred = model.predict(images)
                else:
                    pred = predict_image(model, images, protocol, out_size=tuple(masks.shape[-2:]))
            matrix.update(pred, masks)
    finally:
        model.train(was_training)
    return matrix.all_reduce()


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    num_classes: int | None = None,
    ignore_index: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
    amp: str = "none",
    class_names: Sequence[str] | None = None,
    protocol: EvalProtocol | str | None = None,
) -> dict[str, Any]:
    """Dataset-level mIoU / mAcc / aAcc / fwIoU and per-class IoU / Acc of ``model.predict`` on ``dataset``.

    Under DDP every rank must call this; each evaluates its shard and the matrices are summed, so all ranks get
    the same numbers.

    Args:
        model: Follows the fastseg model contract (``predict(images) -> (B, H, W)`` class ids).
        dataset: Yields dicts with "image" ``(3, H, W)`` and "mask" ``(H, W)`` (or ``(image, mask)`` pairs).
        batch_size: Images per forward pass.
        device: ``"auto"`` keeps the model where it is; ``"cpu"``/``"cuda"`` moves it there.
        num_classes: Defaults to ``model.pretrained_cfg.num_classes``.
        ignore_index: Defaults to ``model.pretrained_cfg.ignore_index``, else 255.
        progress: Show a tqdm bar (only on rank 0 and only on a terminal).
        num_workers: DataLoader workers.
        amp: ``"none" | "bf16" | "fp16"`` autocast for the forward pass (CUDA only; ignored on CPU).
        class_names: Names for the ``"table"`` entry; defaults to ``model.pretrained_cfg.class_names``.
        protocol: How each image is predicted (see :func:`resolve_protocol`): ``None`` uses the dataset's
            ``eval_protocol`` when it has one, a mode name (``"whole"``, ``"slide"``, ``"ms_flip"``) adapts it.

    Returns:
        The :meth:`ConfusionMatrix.compute` dict (``mIoU``, ``mAcc``, ``aAcc``, ``fwIoU``, ``IoU``, ``Acc``,
        ``num_pixels``) plus ``"table"``, the printable per-class table, and for datasets with zero-shot
        ``unseen_classes`` ``mIoU_seen``, ``mIoU_unseen`` and ``hIoU`` (:func:`seen_unseen_miou`).
    """
    matrix = evaluate_confusion(
        model, dataset, batch_size, device, num_classes, ignore_index, progress, num_workers, amp, protocol
    )
    metrics = matrix.compute()
    metrics.update(seen_unseen_miou(metrics["IoU"], getattr(dataset, "unseen_classes", ())))
    names = class_names if class_names is not None else model_cfg_value(model, "class_names")
    if names is not None and len(names) != matrix.num_classes:
        names = None
    metrics["table"] = matrix.table(list(names) if names is not None else None)
    return metrics


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` of images ("precise BN").

    Training updates the running statistics with an exponential average over whatever passed through the network in
    train mode, which is not always the test distribution: UniMatch's strong views and S4MIM's masked inputs move them
    too. Here every BatchNorm restarts its statistics and takes the plain average over the batches of the batch mean
    and (unbiased) variance, the rest of the network in eval mode (no dropout, the model's inference path). Weights
    are untouched; the model is left in eval mode. If ``batches`` raises or is empty, the old statistics are put
    back. Returns the number of images seen.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to re-estimate")
    saved = [
        (m.momentum, {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num"))})
        for m in norms
    ]
    model.eval()
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()
        for images in batches:
            model(images)
            seen += images.shape[0]
        if seen == 0:
            raise ValueError("recompute_bn_statistics got no images")
    except BaseException:
        for m, (_, buffers) in zip(norms, saved):
            m.load_state_dict(buffers, strict=False)
        raise
    finally:
        for m, (momentum, _) in zip(norms, saved):
            m.momentum = momentum
            m.eval()
    return seen
