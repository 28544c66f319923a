"""Mask2Former's training targets, Hungarian matcher and set criterion (Cheng et al., CVPR 2022).

* **Targets** (`targets_from_batch`): per image a list of segments ``(labels (M,), masks (M, H, W) bool)`` and a
  ``valid`` map (False on ``ignore_index`` pixels, which count nowhere). Panoptic targets take one segment per thing
  instance (``"instances"`` ids with ``"instance_classes"``) and one per stuff class present; semantic targets (a
  batch with only ``"mask"``) take one segment per class present, as Mask2Former trains on semantic datasets.
* **Matcher** (`HungarianMatcher`): per image the cost ``C = w_class * (-p_q(c_m)) + w_mask * BCE(m_q, t_m) +
  w_dice * dice(m_q, t_m)`` with ``p`` the softmax class probabilities, and the mask costs averaged over the same
  ``num_points`` uniformly random points for predictions and targets (only valid points count);
  ``scipy.optimize.linear_sum_assignment`` on the ``Q x M`` matrix.
* **Losses** (`SetCriterion`): cross-entropy over all ``Q`` queries with the matched class or "no object" (class
  ``K``) whose weight is ``eos_coef = 0.1``; for matched pairs, sigmoid BCE and dice on ``num_points`` points chosen
  by importance sampling (``oversample_ratio * num_points`` random candidates, the ``importance_sample_ratio``
  share with the most uncertain prediction ``-|logit|`` kept, the rest uniform), each normalised by the number of
  target segments in the batch. Applied to the final prediction and every auxiliary (per-layer) prediction with
  the official weights (class 2, mask 5, dice 5).

Deviation from the official code: pixels with ``ignore_index`` are excluded from the mask costs and losses (a
point's weight is 0 there) instead of counting as background of every segment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HungarianMatcher",
    "SegmentTargets",
    "SetCriterion",
    "point_sample",
    "sample_uncertain_points",
    "targets_from_batch",
]


@dataclass
class SegmentTargets:
    """Ground-truth segments of one image: ``labels`` (M,) int64, ``masks`` (M, H, W) bool, ``valid`` (H, W) bool."""

    labels: Tensor
    masks: Tensor
    valid: Tensor


def targets_from_batch(
    batch: Mapping[str, Tensor],
    num_classes: int,
    ignore_index: int,
    stuff_classes: Sequence[int] = (),
    use_instances: bool = True,
) -> list[SegmentTargets]:
    """Segments per image from a collated shapes-world (or any fastseg) batch; see the module docstring.

    ``use_instances`` with ``"instances"`` and ``"instance_classes"`` present gives panoptic targets (thing classes
    = every class not in ``stuff_classes``); otherwise semantic targets. Raises ``ValueError`` naming the image and
    id for an instance id without a class, or a class outside ``[0, num_classes)``.
    """
    masks = batch["mask"]
    panoptic = use_instances and "instances" in batch and "instance_classes" in batch
    stuff = torch.zeros(num_classes + 1, dtype=torch.bool, device=masks.device)
    if stuff_classes:
        stuff[torch.as_tensor(list(stuff_classes), device=masks.device)] = True
    out = []
    for b in range(masks.shape[0]):
        sem = masks[b].long()
        valid = sem != ignore_index
        labels: list[int] = []
        segs: list[Tensor] = []
        classes = torch.unique(sem[valid]).tolist()
        if panoptic:
            inst = batch["instances"][b].long()
            inst_classes = batch["instance_classes"][b].long()
            for cls in classes:  # stuff: one segment per class, outside every instance
                if stuff[cls]:
                    seg = (sem == cls) & (inst == 0)
                    if bool(seg.any()):
                        labels.append(cls)
                        segs.append(seg)
            for iid in torch.unique(inst[valid & (inst > 0)]).tolist():
                if iid > inst_classes.numel() or int(inst_classes[iid - 1]) < 0:
                    raise ValueError(
                        f"image {b}: instance id {iid} has no class in 'instance_classes' ({inst_classes.tolist()})"
                    )
                cls = int(inst_classes[iid - 1])
                if not 0 <= cls < num_classes:
                    raise ValueError(f"image {b}: instance {iid} has class {cls}, outside [0, {num_classes})")
                labels.append(cls)
                segs.append(valid & (inst == iid))
        else:
            for cls in classes:
                labels.append(cls)
                segs.append(sem == cls)
        mask_stack = torch.stack(segs) if segs else sem.new_zeros((0, *sem.shape), dtype=torch.bool)
        out.append(SegmentTargets(torch.tensor(labels, dtype=torch.long, device=sem.device), mask_stack, valid))
    return out


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinear read of ``maps`` (N, C, H, W) at ``coords`` (N, P, 2), (x, y) in [0, 1] -> (N, C, P)."""
    return F.grid_sample(maps, 2.0 * coords[:, :, None] - 1.0, mode="bilinear", align_corners=False)[..., 0]


def sample_uncertain_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend's importance sampling over mask ``logits`` (N, 1, H, W) -> coords (N, num_points, 2) in [0, 1]."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device, generator=generator)
    uncertainty = -point_sample(logits, coords).abs()[:, 0]  # (N, num_sampled): 0 is the most uncertain
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - num_uncertain, 2, device=logits.device, generator=generator)
    return torch.cat([chosen, rest], dim=1)


def _weighted_bce(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Per-row mean of the sigmoid BCE over the points with weight 1 (N, P) -> (N,)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (bce * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


def _dice(probs: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Per-row dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` over the weighted points (N, P) -> (N,)."""
    probs, targets = probs * weights, targets * weights
    return 1.0 - (2.0 * (probs * targets).sum(-1) + 1.0) / (probs.sum(-1) + targets.sum(-1) + 1.0)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments (see the module docstring)."""

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice, self.num_points = cost_class, cost_mask, cost_dice, num_points

    @torch.no_grad()
    def forward(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: Sequence[SegmentTargets],
        generator: torch.Generator | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Returns per image ``(query_idx, target_idx)`` int64 tensors of equal length ``min(Q, M)``."""
        from scipy.optimize import linear_sum_assignment

        out = []
        for b, tgt in enumerate(targets):
            if tgt.labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.long)
                out.append((empty, empty))
                continue
            prob = pred_logits[b].float().softmax(-1)  # (Q, K+1)
            cost_class = -prob[:, tgt.labels]
            coords = torch.rand(1, self.num_points, 2, device=pred_masks.device, generator=generator)
            pred = point_sample(pred_masks[b][:, None].float(), coords.expand(pred_masks.shape[1], -1, -1))[:, 0]
            tgt_pts = point_sample(tgt.masks[:, None].float(), coords.expand(tgt.masks.shape[0], -1, -1))[:, 0]
            weight = (point_sample(tgt.valid[None, None].float(), coords)[0, 0] > 0.5).float()  # (P,)
            norm = weight.sum().clamp_min(1.0)
            # BCE(x, t) = softplus(x) - x t: pairwise by one matmul over the points.
            pos, neg = F.softplus(-pred) * weight, F.softplus(pred) * weight
            cost_mask = (pos @ tgt_pts.T + neg @ (1 - tgt_pts).T) / norm
            p = pred.sigmoid() * weight
            t = tgt_pts * weight
            cost_dice = 1 - (2 * p @ t.T + 1) / (p.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
            cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return out


class SetCriterion(nn.Module):
    """Class, BCE and dice losses of Mask2Former over the matched queries, summed over all decoder layers.

    Args:
        num_classes: K (the no-object class is K).
        matcher: the `HungarianMatcher`.
        eos_coef: weight of the no-object class in the cross-entropy (0.1).
        class_weight, mask_weight, dice_weight: loss weights (2, 5, 5).
        num_points: points per mask for the mask losses (12544 officially: 112 x 112).
        oversample_ratio, importance_sample_ratio: importance sampling (3.0, 0.75).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.num_points, self.oversample_ratio, self.importance_sample_ratio = (
            num_points,
            oversample_ratio,
            importance_sample_ratio,
        )
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def _layer_losses(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: Sequence[SegmentTargets],
        num_masks: float,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        indices = self.matcher(pred_logits, pred_masks, targets, generator=generator)
        target_classes = torch.full(
            pred_logits.shape[:2], self.num_classes, dtype=torch.long, device=pred_logits.device
        )
        for b, (rows, cols) in enumerate(indices):
            target_classes[b, rows.to(pred_logits.device)] = targets[b].labels[cols.to(pred_logits.device)]
        loss_ce = F.cross_entropy(
            pred_logits.transpose(1, 2).float(), target_classes, self.empty_weight.to(pred_logits.device)
        )
        src = [pred_masks[b, rows] for b, (rows, _) in enumerate(indices)]
        if sum(s.shape[0] for s in src) == 0:  # no segment anywhere: mask losses are 0 but keep the graph
            zero = pred_masks.sum() * 0.0
            return {"loss_ce": loss_ce, "loss_mask": zero, "loss_dice": zero}
        src_masks = torch.cat(src)[:, None].float()  # (N, 1, h, w)
        tgt_masks = torch.cat([t.masks[cols] for t, (_, cols) in zip(targets, indices)])[:, None].float()
        valid = torch.cat([t.valid[None].expand(len(cols), -1, -1) for t, (_, cols) in zip(targets, indices)])
        with torch.no_grad():
            coords = sample_uncertain_points(
                src_masks, self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator
            )
            labels = point_sample(tgt_masks, coords)[:, 0]
            weights = (point_sample(valid[:, None].float(), coords)[:, 0] > 0.5).float()
        logits = point_sample(src_masks, coords)[:, 0]
        return {
            "loss_ce": loss_ce,
            "loss_mask": _weighted_bce(logits, labels, weights).sum() / num_masks,
            "loss_dice": _dice(logits.sigmoid(), labels, weights).sum() / num_masks,
        }

    def forward(
        self, outputs: Mapping[str, object], targets: Sequence[SegmentTargets], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``outputs``: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w) and ``aux_outputs`` (a list of
        such dicts, one per earlier decoder layer). Returns ``loss`` (weighted total over all layers) and the
        final layer's unweighted ``loss_ce`` / ``loss_mask`` / ``loss_dice`` (detached, for logging)."""
        num_masks = max(float(sum(t.labels.numel() for t in targets)), 1.0)
        layers = [outputs] + list(outputs.get("aux_outputs", []))  # type: ignore[arg-type]
        total = None
        final: dict[str, Tensor] = {}
        for i, layer in enumerate(layers):
            losses = self._layer_losses(layer["pred_logits"], layer["pred_masks"], targets, num_masks, generator)
            weighted = sum(self.weights[k] * v for k, v in losses.items())
            total = weighted if total is None else total + weighted
            if i == 0:
                final = {k: v.detach() for k, v in losses.items()}
        return {"loss": total, **final}
