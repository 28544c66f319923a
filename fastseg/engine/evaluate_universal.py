"""Panoptic (PQ / SQ / RQ) and instance (mask AP) evaluation of a universal model on the shapes world.

A universal model has ``predict(images, task="panoptic")`` -> (B, H, W) panoptic ids (``class * label_divisor +
instance``, negative = void) and ``predict(images, task="instance")`` -> per image ``masks`` / ``scores`` /
``labels`` (e.g. `fastseg.models.mask2former.Mask2Former`). Ground truth comes from the dataset's samples:
``"panoptic"`` (or ``"mask"`` + ``"instances"``) for PQ, ``"instances"`` + ``"instance_classes"`` for AP (an
instance's mask is every pixel with its id, the ignore band included: it is the object's full extent).

Under DDP each rank evaluates the strided shard ``rank, rank + world_size, ...`` and the metrics are merged
(PQ statistics summed, AP images gathered), so the numbers equal a single-process run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.shapes import panoptic_map
from ..metrics.instance_ap import InstanceAP
from ..metrics.panoptic import PanopticQuality
from .distributed import get_rank, get_world_size
from .evaluate import model_cfg_value

__all__ = ["evaluate_universal", "instance_targets"]


def instance_targets(batch: dict[str, torch.Tensor], thing_classes: Iterable[int]) -> list[dict[str, torch.Tensor]]:
    """Per image ``masks`` (M, H, W) bool and ``labels`` (M,) of the thing instances of a shapes batch."""
    things = {int(c) for c in thing_classes}
    out = []
    for inst, classes in zip(batch["instances"], batch["instance_classes"]):
        ids = [i for i in torch.unique(inst).tolist() if i > 0]
        labels = [int(classes[i - 1]) for i in ids]
        keep = [k for k, c in enumerate(labels) if c in things]
        masks = (
            torch.stack([inst == ids[k] for k in keep]) if keep else inst.new_zeros((0, *inst.shape), dtype=torch.bool)
        )
        out.append({"masks": masks, "labels": torch.tensor([labels[k] for k in keep], dtype=torch.long)})
    return out


@torch.inference_mode()
def evaluate_universal(
    model: nn.Module,
    dataset: Dataset,
    tasks: Sequence[str] = ("panoptic", "instance"),
    batch_size: int = 8,
    subsets: dict[str, Iterable[int]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """PQ / SQ / RQ (``"panoptic"``) and mask AP (``"instance"``) of ``model`` on ``dataset``.

    Returns ``{"panoptic": PanopticQuality.compute(subsets) + "table", "instance": InstanceAP.compute(subsets)}``
    for the requested tasks. The model is put in eval mode and restored afterwards.
    """
    unknown = [t for t in tasks if t not in ("panoptic", "instance")]
    if unknown:
        raise ValueError(f"evaluate_universal: unknown tasks {unknown}; use 'panoptic' and / or 'instance'")
    stuff = list(model_cfg_value(model, "stuff_classes", ()) or ())
    things = list(model_cfg_value(model, "thing_classes", ()) or ())
    num_classes = int(model_cfg_value(model, "num_classes"))
    if not things:
        things = [c for c in range(num_classes) if c not in stuff]
    divisor = int(model_cfg_value(model, "label_divisor", 1000))
    ignore = int(model_cfg_value(model, "ignore_index", 255))
    names = model_cfg_value(model, "class_names")
    pq = PanopticQuality(things, stuff, divisor, class_names=names) if "panoptic" in tasks else None
    ap = InstanceAP(things, class_names=names) if "instance" in tasks else None
    rank, world = get_rank(), get_world_size()
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
            images = batch["image"].to(device)
            if pq is not None:
                target = batch.get("panoptic")
                if target is None:
                    target = panoptic_map(batch["mask"], batch["instances"], ignore, divisor)
                pq.update(model.predict(images, task="panoptic").cpu(), target)
            if ap is not None:
                preds = [{k: v.cpu() for k, v in p.items()} for p in model.predict(images, task="instance")]
                ap.update(preds, instance_targets(batch, things))
    finally:
        model.train(was_training)
    out: dict[str, Any] = {}
    if pq is not None:
        pq.all_reduce()
        out["panoptic"] = pq.compute(subsets)
        out["panoptic"]["table"] = pq.table()
    if ap is not None:
        ap.all_reduce()
        out["instance"] = ap.compute({k: [c for c in v if c in things] for k, v in (subsets or {}).items()})
    return out
