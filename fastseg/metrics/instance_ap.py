"""Mask AP (COCO's instance segmentation metric) through ``pycocotools``: AP (IoU 0.50:0.95), AP50, AP75.

Predictions and ground truth are kept as run-length encodings (``pycocotools.mask.encode``), so a dataset's worth
costs little memory and metrics from several processes merge by concatenation (`merge`, `all_reduce`). `compute`
builds the ground-truth and detection ``COCO`` objects in memory (no files) and runs ``COCOeval(iouType="segm")``
with COCO's defaults (101 recall points, at most 100 detections per image, area ranges all / small / medium /
large), once for all classes and once per named class subset (``params.catIds``). Ground-truth ``iscrowd``
regions are handled by COCOeval (a detection on a crowd region is neither a true nor a false positive).

Class ids are fastseg's 0-based ids; COCO category ids are ``class_id + 1`` internally. An image without
predictions is fine (it only adds false negatives); a dataset without any prediction gets AP 0 for every class
with ground truth, which is what COCOeval computes when it is given no detections.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["InstanceAP", "encode_masks"]


def _mask_api():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:  # pragma: no cover - pycocotools is in the install extras
        raise ImportError("InstanceAP needs pycocotools: pip install pycocotools") from err
    return mask_utils


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) boolean masks -> COCO RLEs (``counts`` as str, JSON-ready)."""
    mask_utils = _mask_api()
    arr = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {arr.shape}")
    if arr.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(arr.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


class InstanceAP:
    """Accumulates instance predictions and ground truth; `compute` returns COCO mask AP.

    Args:
        classes: the class ids that are evaluated (thing classes); others in the inputs are refused.
        class_names: optional names (reported per class).
    """

    def __init__(self, classes: Iterable[int], class_names: Sequence[str] | None = None) -> None:
        self.classes = sorted({int(c) for c in classes})
        if not self.classes or self.classes[0] < 0:
            raise ValueError(f"need at least one non-negative class id, got {self.classes}")
        self.class_names = list(class_names) if class_names is not None else None
        self.images: list[dict[str, Any]] = []  # one record per image: size, gt and dt annotations

    def reset(self) -> None:
        self.images.clear()

    def _check_labels(self, labels: torch.Tensor, what: str, image: int) -> list[int]:
        values = [int(v) for v in labels.reshape(-1).tolist()]
        bad = [v for v in values if v not in self.classes]
        if bad:
            raise ValueError(
                f"{what} of image {image} has class {bad[0]}, not among the evaluated classes {self.classes}"
            )
        return values

    def update(
        self, preds: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        """Add a batch.

        Args:
            preds: per image ``masks`` (N, H, W) bool, ``scores`` (N,), ``labels`` (N,) (`Mask2Former.predict(...,
                task="instance")`).
            targets: per image ``masks`` (M, H, W) bool, ``labels`` (M,), optional ``iscrowd`` (M,) bool.
        """
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        for b, (pred, tgt) in enumerate(zip(preds, targets)):
            if pred["masks"].shape[-2:] != tgt["masks"].shape[-2:]:
                raise ValueError(
                    f"image {b}: prediction masks {tuple(pred['masks'].shape)} and target masks "
                    f"{tuple(tgt['masks'].shape)} differ in size"
                )
            n, m = pred["masks"].shape[0], tgt["masks"].shape[0]
            if pred["scores"].numel() != n or pred["labels"].numel() != n or tgt["labels"].numel() != m:
                raise ValueError(f"image {b}: masks, scores and labels disagree in count")
            crowd = tgt.get("iscrowd")
            crowd_l = [bool(c) for c in crowd.tolist()] if crowd is not None else [False] * m
            self.images.append(
                {
                    "size": tuple(int(s) for s in tgt["masks"].shape[-2:]),
                    "gt": list(
                        zip(encode_masks(tgt["masks"].bool()), self._check_labels(tgt["labels"], "target", b), crowd_l)
                    ),
                    "dt": list(
                        zip(
                            encode_masks(pred["masks"].bool()),
                            self._check_labels(pred["labels"], "prediction", b),
                            [float(s) for s in pred["scores"].tolist()],
                        )
                    ),
                }
            )

    def merge(self, other: InstanceAP) -> InstanceAP:
        if other.classes != self.classes:
            raise ValueError("cannot merge InstanceAP metrics over different classes")
        self.images.extend(other.images)
        return self

    def all_reduce(self) -> InstanceAP:
        """Gather every process's images (collective; no-op without a process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.images)
        self.images = [img for part in gathered for img in part]
        return self

    def _coco(self) -> tuple[Any, Any]:
        from pycocotools.coco import COCO

        mask_utils = _mask_api()
        categories = [{"id": c + 1, "name": str(c)} for c in self.classes]
        images, gts, dts = [], [], []
        for i, img in enumerate(self.images):
            h, w = img["size"]
            images.append({"id": i + 1, "height": h, "width": w})
            for rle, label, crowd in img["gt"]:
                gts.append(
                    {
                        "id": len(gts) + 1,
                        "image_id": i + 1,
                        "category_id": label + 1,
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": mask_utils.toBbox(rle).tolist(),
                        "iscrowd": int(crowd),
                    }
                )
            for rle, label, score in img["dt"]:
                dts.append(
                    {
                        "id": len(dts) + 1,
                        "image_id": i + 1,
                        "category_id": label + 1,
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": mask_utils.toBbox(rle).tolist(),
                        "score": score,
                        "iscrowd": 0,
                    }
                )
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "annotations": gts, "categories": categories}
        coco_dt.dataset = {"images": images, "annotations": dts, "categories": categories}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt.createIndex()
            coco_dt.createIndex()
        return coco_gt, coco_dt

    def _evaluate(self, coco_gt: Any, coco_dt: Any) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """One COCOeval over all classes: the summary and per class AP / AP50 / AP75 (from ``eval["precision"]``;
        categories are evaluated independently, so a subset's AP is the mean over its classes)."""
        from pycocotools.cocoeval import COCOeval

        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.catIds = [c + 1 for c in self.classes]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        summary = {n: (float(v) if v >= 0 else math.nan) for n, v in zip(names, ev.stats[:6])}
        precision = ev.eval["precision"][:, :, :, 0, -1]  # (IoU thresholds, recall points, classes), area all, 100 dets
        iou_50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
        iou_75 = int(np.argmin(np.abs(ev.params.iouThrs - 0.75)))
        per_class = {}
        for k, c in enumerate(self.classes):
            p = precision[:, :, k]
            if (p > -1).any():  # -1: no ground truth of this class
                per_class[c] = {
                    "AP": float(p[p > -1].mean()),
                    "AP50": float(p[iou_50].mean()),
                    "AP75": float(p[iou_75].mean()),
                }
        return summary, per_class

    def compute(self, subsets: dict[str, Iterable[int]] | None = None) -> dict[str, Any]:
        """``AP``, ``AP50``, ``AP75``, ``APs/m/l`` over all classes (fractions, NaN when nothing to measure),
        ``per_class`` ({class: {AP, AP50, AP75}} for classes with ground truth), and per named subset a dict of
        ``AP``, ``AP50``, ``AP75`` (mean over the subset's classes with ground truth, as COCOeval restricted to
        those categories gives)."""
        if not self.images:
            raise ValueError("InstanceAP.compute: no image was added")
        summary, per_class = self._evaluate(*self._coco())
        out: dict[str, Any] = dict(summary)
        for name, classes in (subsets or {}).items():
            classes = [int(c) for c in classes]
            unknown = [c for c in classes if c not in self.classes]
            if unknown:
                raise ValueError(f"subset {name!r} names classes {unknown} that are not evaluated")
            rows = [per_class[c] for c in classes if c in per_class]
            out[name] = {
                m: (float(np.mean([r[m] for r in rows])) if rows else math.nan) for m in ("AP", "AP50", "AP75")
            }
        out["per_class"] = per_class
        return out
