"""Dataset-level confusion matrix and the mIoU family (mIoU, mAcc, aAcc, fwIoU, per-class IoU / Acc).

Conventions (the paper / mmsegmentation / detectron2 ones, ``specs/aesthetics_ecosystem.md`` 3.3):

* One ``K x K`` matrix is accumulated over the whole dataset (rows = ground truth, columns = prediction); the
  metrics are computed once from it, not averaged per image.
* Pixels whose **target** equals ``ignore_index`` are dropped entirely, whatever was predicted there. Nothing else
  is ignored: a prediction of a class absent from the ground truth counts as a false positive.
* Per class ``c`` with ``TP = M[c, c]``, ``GT = sum_j M[c, j]``, ``PRED = sum_i M[i, c]``:
  ``IoU_c = TP / (GT + PRED - TP)`` and ``Acc_c = TP / GT``.
  A class with ``GT + PRED - TP == 0`` (absent from both target and prediction) has ``IoU = NaN``; a class with
  ``GT == 0`` has ``Acc = NaN``. NaN classes are excluded from mIoU / mAcc (``nanmean``), as in mmseg.
  A class absent from the target but predicted somewhere has ``IoU = 0`` and does lower mIoU.
* ``aAcc = trace(M) / sum(M)`` (pixel accuracy); ``fwIoU = sum_c (GT_c / sum(M)) * IoU_c`` over non-NaN classes.

This equals ``torchmetrics.classification.MulticlassJaccardIndex(num_classes, ignore_index=255, average="macro")``
(tested); note that ``torchmetrics.segmentation.MeanIoU`` averages per image and has no ignore index, so it differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` int64 confusion matrix over a dataset.

    Args:
        num_classes: Number of classes ``K``; valid labels and predictions are ``0 .. K-1``.
        ignore_index: Target value whose pixels are skipped (``None`` to ignore nothing).
        device: Where the matrix lives; by default it moves to the device of the first ``update``.

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 255]]))
        >>> cm.compute()["mIoU"]
        1.0
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, device: torch.device | str | None = None):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class id for num_classes={num_classes}; "
                f"use a value outside 0..{num_classes - 1} (255 by convention)"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._device_fixed = device is not None
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the accumulated counts."""
        self.matrix.zero_()

    # ----------------------------------------------------------------------------------------------------------
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: Class ids with the target's shape (e.g. ``(B, H, W)``), or logits ``(B, K, H, W)`` which are
                reduced with ``argmax`` over dim 1.
            target: Integer labels ``(B, H, W)`` (any shape matching ``pred``); ``ignore_index`` pixels skipped.

        Raises:
            ValueError: Shapes differ, labels are not integers, a target label is outside ``0..K-1`` and not the
                ignore index, or a prediction is outside ``0..K-1``. The message names the offending value.
        """
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(f"pred and target must be tensors, got {type(pred).__name__} and {type(target).__name__}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
        if pred.is_floating_point() and pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {pred.shape[1]} channels but the metric has num_classes={self.num_classes}"
                )
            pred = pred.argmax(dim=1)
        elif pred.is_floating_point() or pred.dtype == torch.bool:
            raise ValueError(
                f"pred must hold integer class ids (or logits with one more dim than target), got dtype {pred.dtype} "
                f"and shape {tuple(pred.shape)} for target shape {tuple(target.shape)}"
            )
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        if not self._device_fixed and self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        self._device_fixed = True
        pred = pred.to(self.matrix.device).reshape(-1).long()
        target = target.to(self.matrix.device).reshape(-1).long()

        keep = (
            target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        )
        target = target[keep]
        pred = pred[keep]
        K = self.num_classes
        bad_target = (target < 0) | (target >= K)
        if bool(bad_target.any()):
            values = torch.unique(target[bad_target])
            raise ValueError(
                f"target label {int(values[0])} is outside 0..{K - 1} and is not the ignore index "
                f"({self.ignore_index}); offending values: {values[:8].tolist()} "
                f"({int(bad_target.sum())} pixels). Is num_classes={K} right for this dataset?"
            )
        bad_pred = (pred < 0) | (pred >= K)
        if bool(bad_pred.any()):
            values = torch.unique(pred[bad_pred])
            raise ValueError(
                f"predicted class {int(values[0])} is outside 0..{K - 1}; offending values: {values[:8].tolist()} "
                f"({int(bad_pred.sum())} pixels)"
            )
        # bincount over the flattened (target, pred) pair: one pass, no K x N one-hot.
        self.matrix += torch.bincount(target * K + pred, minlength=K * K).reshape(K, K)

    # ----------------------------------------------------------------------------------------------------------
    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all ``torch.distributed`` processes (a no-op without an initialised group).

        NCCL only reduces CUDA tensors, so the matrix is moved to the current CUDA device for the reduction
        and moved back afterwards. Every rank must call this (it is a collective).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        matrix = self.matrix
        if dist.get_backend() == "nccl" and matrix.device.type != "cuda":
            matrix = matrix.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
        self.matrix = matrix.to(self.matrix.device)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix of the same size (e.g. from another worker) into this one."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {other.num_classes} and {self.num_classes} classes")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    # ----------------------------------------------------------------------------------------------------------
    def compute(self) -> dict[str, object]:
        """Metrics from the accumulated matrix.

        Returns:
            ``{"mIoU", "mAcc", "aAcc", "fwIoU"}`` as floats in ``[0, 1]`` (NaN when nothing was counted),
            ``"IoU"`` and ``"Acc"`` as per-class lists (NaN for classes with nothing to measure, see the module
            docstring), and ``"num_pixels"``, the number of non-ignored pixels counted.
        """
        m = self.matrix.detach().to("cpu", torch.float64)
        tp = m.diagonal()
        gt = m.sum(dim=1)
        predicted = m.sum(dim=0)
        union = gt + predicted - tp
        total = m.sum()
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
        valid_iou = ~torch.isnan(iou)
        if total > 0:
            freq = gt / total
            fw_iou = float((freq[valid_iou] * iou[valid_iou]).sum())
            a_acc = float(tp.sum() / total)
        else:
            fw_iou = a_acc = float("nan")
        return {
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "aAcc": a_acc,
            "fwIoU": fw_iou,
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
            "num_pixels": int(total),
        }

    def table(self, class_names: Sequence[str] | None = None, digits: int = 2) -> str:
        """A per-class IoU / Acc table in percent plus the summary metrics, ready to print.

        Args:
            class_names: One name per class; defaults to ``class_0 .. class_{K-1}``.
            digits: Decimals of the percentages.
        """
        if class_names is None:
            class_names = [f"class_{i}" for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for num_classes={self.num_classes}")
        metrics = self.compute()

        def pct(value: float) -> str:
            return "-" if math.isnan(value) else f"{100 * value:.{digits}f}"

        width = max(5, *(len(str(n)) for n in class_names))
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 18)]
        for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
            lines.append(f"{name!s:<{width}}  {pct(iou):>7}  {pct(acc):>7}")
        lines.append("-" * (width + 18))
        lines.append(
            f"mIoU {pct(metrics['mIoU'])}  mAcc {pct(metrics['mAcc'])}  aAcc {pct(metrics['aAcc'])}  "
            f"fwIoU {pct(metrics['fwIoU'])}  ({metrics['num_pixels']} pixels; '-' = nothing to measure)"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, pixels={int(self.matrix.sum())})"


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")
