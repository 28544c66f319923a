"""Panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019) as COCO's panoptic evaluation computes it.

Inputs are panoptic maps in the ``class_id * label_divisor + instance_id`` encoding (stuff: any instance id, one
segment per id), negative values = void. Per image and per segment (panopticapi ``pq_compute`` semantics):

* a predicted and a ground-truth segment of the same class match when ``IoU > 0.5``, where the union leaves out
  the predicted pixels that fall on ground-truth void: ``IoU = |p & g| / (|p| + |g| - |p & g| - |p & void|)``.
  Matching is unique for IoU > 0.5, so no assignment is needed;
* an unmatched ground-truth segment is a false negative unless it is a crowd region (crowd segments are never
  matched and never counted);
* an unmatched prediction is a false positive unless more than half of it lies on ground-truth void plus the
  crowd regions of its class;
* per class ``PQ = sum IoU / (TP + FP/2 + FN/2)``, ``SQ = sum IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``;
  averages are over the classes of the subset with ``TP + FP + FN > 0`` (others are excluded, as panopticapi does).

Crowd regions are passed per image as the ground-truth ids that are crowd (COCO's ``iscrowd``); COCO marks crowd
only on thing classes, and a crowd id of a stuff class is refused. panopticapi keeps one crowd segment per class
and image (COCO has at most one); here all crowd segments of the class count, which is the same on COCO data.

Bad input: a ground-truth or predicted id whose class is neither a thing nor a stuff class is refused with the id
and image named (panopticapi raises for unknown prediction categories too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

__all__ = ["PanopticQuality"]

_IOU, _TP, _FP, _FN = range(4)


class PanopticQuality:
    """Accumulates per-class PQ statistics (sum of matched IoU, TP, FP, FN) over a dataset.

    Args:
        things: thing class ids.
        stuffs: stuff class ids (disjoint from ``things``).
        label_divisor: the panoptic encoding's divisor.
        class_names: optional names for `table`.

    Example:
        >>> pq = PanopticQuality(things={1}, stuffs={0})
        >>> pq.update(torch.tensor([[[0, 1001]]]), torch.tensor([[[0, 1001]]]))
        >>> pq.compute()["PQ"]
        1.0
    """

    def __init__(
        self,
        things: Iterable[int],
        stuffs: Iterable[int],
        label_divisor: int = 1000,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.things, self.stuffs = sorted({int(c) for c in things}), sorted({int(c) for c in stuffs})
        if set(self.things) & set(self.stuffs):
            raise ValueError(f"things and stuffs overlap: {sorted(set(self.things) & set(self.stuffs))}")
        classes = self.things + self.stuffs
        if not classes or min(classes) < 0:
            raise ValueError(
                f"need at least one class and non-negative class ids, got things {self.things}, stuffs {self.stuffs}"
            )
        if label_divisor < 1:
            raise ValueError(f"label_divisor must be >= 1, got {label_divisor}")
        self.label_divisor = int(label_divisor)
        self.num_classes = max(classes) + 1
        self.class_names = list(class_names) if class_names is not None else None
        self._known = torch.zeros(self.num_classes, dtype=torch.bool)
        self._known[classes] = True
        self.stats = torch.zeros(self.num_classes, 4, dtype=torch.float64)  # [sum IoU, TP, FP, FN] per class

    def reset(self) -> None:
        self.stats.zero_()

    # ------------------------------------------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor, what: str, image: int) -> torch.Tensor:
        classes = ids // self.label_divisor
        bad = (classes >= self.num_classes) | ~self._known[classes.clamp(0, self.num_classes - 1)]
        if bool(bad.any()):
            seg = int(ids[bad][0])
            raise ValueError(
                f"{what} of image {image}: segment id {seg} decodes to class {seg // self.label_divisor}, which is "
                f"neither a thing {self.things} nor a stuff class {self.stuffs} (label_divisor {self.label_divisor})"
            )
        return classes

    def update(self, preds: torch.Tensor, targets: torch.Tensor, crowd: Sequence[Iterable[int]] | None = None) -> None:
        """Add a batch of panoptic maps.

        Args:
            preds: (B, H, W) or (H, W) integer panoptic ids, negative = void (unassigned).
            targets: same shape; negative = void (ignored pixels).
            crowd: optional, per image the target ids that are crowd regions.
        """
        if preds.shape != targets.shape:
            raise ValueError(
                f"prediction shape {tuple(preds.shape)} does not match target shape {tuple(targets.shape)}"
            )
        if preds.is_floating_point() or targets.is_floating_point():
            raise ValueError("panoptic maps must hold integer ids")
        if preds.dim() == 2:
            preds, targets = preds[None], targets[None]
            crowd = [crowd] if crowd is not None and not _is_nested(crowd) else crowd  # type: ignore[list-item]
        if crowd is not None and len(crowd) != preds.shape[0]:
            raise ValueError(f"crowd must give one collection of ids per image: {len(crowd)} for {preds.shape[0]}")
        for b in range(preds.shape[0]):
            self._update_image(
                preds[b].reshape(-1).long().cpu(),
                targets[b].reshape(-1).long().cpu(),
                {int(c) for c in crowd[b]} if crowd is not None else set(),
                b,
            )

    def _update_image(self, pred: torch.Tensor, gt: torch.Tensor, crowd_ids: set[int], image: int) -> None:
        gt_ids, gt_inv, gt_area = torch.unique(gt, return_inverse=True, return_counts=True)
        pred_ids, pred_inv, pred_area = torch.unique(pred, return_inverse=True, return_counts=True)
        pair, pair_area = torch.unique(gt_inv * len(pred_ids) + pred_inv, return_counts=True)
        gt_of, pred_of = (pair // len(pred_ids)).tolist(), (pair % len(pred_ids)).tolist()
        gt_ids_l, pred_ids_l = gt_ids.tolist(), pred_ids.tolist()
        gt_valid = gt_ids >= 0
        pred_valid = pred_ids >= 0
        gt_cls = torch.full_like(gt_ids, -1)
        pred_cls = torch.full_like(pred_ids, -1)
        gt_cls[gt_valid] = self._check_ids(gt_ids[gt_valid], "target", image)
        pred_cls[pred_valid] = self._check_ids(pred_ids[pred_valid], "prediction", image)
        gt_cls_l, pred_cls_l = gt_cls.tolist(), pred_cls.tolist()
        for cid in crowd_ids:
            if cid not in gt_ids_l:
                continue  # a crowd id absent from this image's map has no pixels: nothing to do
            cls = cid // self.label_divisor
            if cls in self.stuffs:
                raise ValueError(
                    f"target of image {image}: crowd segment {cid} is on stuff class {cls}; COCO marks "
                    "crowd regions only on thing classes"
                )
        is_crowd = [g in crowd_ids for g in gt_ids_l]
        # |pred & gt void| per prediction, and |pred & crowd of its class| per prediction
        void_overlap = [0] * len(pred_ids_l)
        crowd_overlap = [0] * len(pred_ids_l)
        matched_gt, matched_pred = set(), set()
        for g, p, inter in zip(gt_of, pred_of, pair_area.tolist()):
            if not pred_valid[p]:
                continue
            if not gt_valid[g]:
                void_overlap[p] += inter
            elif is_crowd[g] and gt_cls_l[g] == pred_cls_l[p]:
                crowd_overlap[p] += inter
        for g, p, inter in zip(gt_of, pred_of, pair_area.tolist()):
            if not (gt_valid[g] and pred_valid[p]) or is_crowd[g] or gt_cls_l[g] != pred_cls_l[p]:
                continue
            union = int(pred_area[p]) + int(gt_area[g]) - inter - void_overlap[p]
            iou = inter / union
            if iou > 0.5:
                self.stats[gt_cls_l[g], _IOU] += iou
                self.stats[gt_cls_l[g], _TP] += 1
                matched_gt.add(g)
                matched_pred.add(p)
        for g in range(len(gt_ids_l)):
            if gt_valid[g] and g not in matched_gt and not is_crowd[g]:
                self.stats[gt_cls_l[g], _FN] += 1
        for p in range(len(pred_ids_l)):
            if not pred_valid[p] or p in matched_pred:
                continue
            if (void_overlap[p] + crowd_overlap[p]) / int(pred_area[p]) > 0.5:
                continue
            self.stats[pred_cls_l[p], _FP] += 1

    # ------------------------------------------------------------------------------------------------------------
    def merge(self, other: PanopticQuality) -> PanopticQuality:
        """Add another metric's statistics (same classes) into this one."""
        if (other.things, other.stuffs, other.label_divisor) != (self.things, self.stuffs, self.label_divisor):
            raise ValueError("cannot merge PanopticQuality metrics over different classes or label divisors")
        self.stats += other.stats
        return self

    def all_reduce(self) -> PanopticQuality:
        """Sum the statistics over all ``torch.distributed`` processes (collective; no-op without a group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        stats = self.stats
        if dist.get_backend() == "nccl":
            stats = stats.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        self.stats = stats.cpu()
        return self

    def _average(self, classes: Iterable[int]) -> dict[str, float]:
        pq = sq = rq = 0.0
        n = 0
        for c in classes:
            iou, tp, fp, fn = self.stats[c].tolist()
            if tp + fp + fn == 0:
                continue
            n += 1
            pq += iou / (tp + 0.5 * fp + 0.5 * fn)
            sq += iou / tp if tp else 0.0
            rq += tp / (tp + 0.5 * fp + 0.5 * fn)
        if n == 0:
            return {"PQ": math.nan, "SQ": math.nan, "RQ": math.nan, "n": 0}
        return {"PQ": pq / n, "SQ": sq / n, "RQ": rq / n, "n": n}

    def compute(self, subsets: dict[str, Iterable[int]] | None = None) -> dict[str, object]:
        """``PQ`` / ``SQ`` / ``RQ`` over all classes (floats in [0, 1], NaN when nothing was counted), ``things``
        and ``stuff`` dicts of the same, ``per_class`` ({class id: {PQ, SQ, RQ, TP, FP, FN}} for counted classes),
        and one dict per named class subset (e.g. ``{"seen": [...], "unseen": [...]}``)."""
        out: dict[str, object] = dict(self._average(self.things + self.stuffs))
        out["things"] = self._average(self.things)
        out["stuff"] = self._average(self.stuffs)
        for name, classes in (subsets or {}).items():
            classes = [int(c) for c in classes]
            unknown = [c for c in classes if c not in self.things and c not in self.stuffs]
            if unknown:
                raise ValueError(f"subset {name!r} names classes {unknown} that are neither things nor stuff")
            out[name] = self._average(classes)
        per_class = {}
        for c in self.things + self.stuffs:
            iou, tp, fp, fn = self.stats[c].tolist()
            if tp + fp + fn:
                denom = tp + 0.5 * fp + 0.5 * fn
                per_class[c] = {
                    "PQ": iou / denom,
                    "SQ": iou / tp if tp else 0.0,
                    "RQ": tp / denom,
                    "TP": int(tp),
                    "FP": int(fp),
                    "FN": int(fn),
                }
        out["per_class"] = per_class
        return out

    def table(self, digits: int = 1) -> str:
        """Per-class PQ / SQ / RQ in percent and the All / Things / Stuff rows, ready to print."""
        res = self.compute()

        def pct(v: float) -> str:
            return "-" if math.isnan(v) else f"{100 * v:.{digits}f}"

        names = self.class_names or [f"class_{i}" for i in range(self.num_classes)]
        width = max(6, *(len(str(names[c])) for c in self.things + self.stuffs))
        lines = [f"{'class':<{width}}  kind    {'PQ':>6} {'SQ':>6} {'RQ':>6}", "-" * (width + 30)]
        for c in self.things + self.stuffs:
            kind = "thing" if c in self.things else "stuff"
            r = res["per_class"].get(c)  # type: ignore[union-attr]
            vals = (pct(r["PQ"]), pct(r["SQ"]), pct(r["RQ"])) if r else ("-", "-", "-")
            lines.append(f"{names[c]!s:<{width}}  {kind:<6}  {vals[0]:>6} {vals[1]:>6} {vals[2]:>6}")
        lines.append("-" * (width + 30))
        for label, r in (("All", res), ("Things", res["things"]), ("Stuff", res["stuff"])):
            lines.append(f"{label:<{width}}  {'':<6}  {pct(r['PQ']):>6} {pct(r['SQ']):>6} {pct(r['RQ']):>6}")  # type: ignore[index]
        return "\n".join(lines)


def _is_nested(crowd: object) -> bool:
    items = list(crowd)  # type: ignore[call-overload]
    return bool(items) and not isinstance(items[0], int)
