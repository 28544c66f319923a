"""Masking helpers (plain PyTorch): which pixels a masked-image-modelling method hides.

`classwise_patch_mask` is S4MIM's class-wise patch masking (pixel-level within a patch's class by default, or the
whole patch of its majority class). It is a handful of vectorised tensor ops (a histogram per
patch, two stable sorts, a gather) whose cost is negligible next to the network, so it is not a fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseg.kernels._utils import LABEL_DTYPES, check_label_values, check_tensor

__all__ = ["classwise_patch_mask"]


_OWNERSHIPS = ("pixel", "majority")


def _choose_in_groups(
    group: torch.Tensor, num_groups: int, ratio: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Choose ``floor(ratio * n + u)`` of the ``n`` items of every group uniformly without replacement.

    ``group`` (M,) holds each item's group id in ``[0, num_groups]``; id ``num_groups`` means "no group" and is never
    chosen. Random keys ranked per group with two stable sorts; ``u ~ U[0, 1)`` per group (stochastic rounding:
    ``E[m] = ratio * n`` and ``|m - ratio * n| < 1``). Draws ``M`` keys, then ``num_groups + 1`` jitters.
    """
    count, dev = group.numel(), group.device
    keys = torch.rand(count, generator=generator, device=dev)
    order = torch.argsort(keys)
    order = order[torch.argsort(group[order], stable=True)]  # by group, then by random key
    sizes = torch.bincount(group, minlength=num_groups + 1)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count, device=dev) - starts[group[order]]
    jitter = torch.rand(num_groups + 1, generator=generator, device=dev, dtype=torch.float64)
    quota = torch.floor(float(ratio) * sizes.double() + jitter).long().clamp(max=sizes)
    return (rank < quota[group]) & (group != num_groups)


def classwise_patch_mask(
    labels: torch.Tensor,
    patch_size: int,
    ratio: float,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
    num_classes: int | None = None,
    ownership: str = "pixel",
) -> torch.Tensor:
    """Mask a random ``ratio`` of the patches of every class region of every image (plain PyTorch, vectorised).

    The image is cut into ``patch_size`` patches anchored at the top-left corner (edge patches partial). For each
    (image, class) with ``n`` candidate patches, ``m = floor(ratio * n + u)`` of them (``u ~ U[0, 1)``, i.e.
    stochastic rounding: ``E[m] = ratio * n`` and ``|m - ratio * n| < 1``) are chosen uniformly without replacement
    (random keys, ranked per group with two stable sorts). Which patches are a class's candidates, and which pixels a
    chosen patch hides, is ``ownership``:

    * ``"pixel"`` (default): a class's candidates are all the patches that contain at least one of its pixels, and a
      patch chosen for class k hides **only the pixels of class k** in it. A pixel is masked iff its patch was
      chosen for its own class, so masking one class never hides another class's pixels, and a class thinner than
      a patch is still masked. ``ignore_index`` pixels are never masked.
    * ``"majority"``: each patch belongs to its majority class among its labelled pixels (ties: the smallest class
      id); a patch with only ``ignore_index`` pixels belongs to no class and is never masked. A chosen patch hides
      all its pixels, minority classes and ignored pixels included (the rule before issue 18).

    Args:
        labels: ``(B, H, W)`` integer class ids.
        patch_size: masking unit in pixels.
        ratio: fraction of each region's patches to mask, in ``[0, 1]``.
        generator: optional ``torch.Generator`` on ``labels.device`` for reproducible masks.
        ignore_index: label of unlabelled pixels.
        num_classes: K; when None it is taken as the largest label + 1 (one host sync).
        ownership: ``"pixel"`` or ``"majority"`` (above).

    Returns:
        ``masked (B, H, W)`` bool.

    Raises:
        ValueError: on a bad ``labels`` tensor, ``patch_size``, ``ratio`` or ``ownership``, or a label outside
        ``[0, K)`` that is not ``ignore_index``.
    """
    op = "classwise_patch_mask"
    check_tensor("labels", labels, ndim=3, dtypes=LABEL_DTYPES, op=op)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"{op}: ratio must lie in [0, 1], got {ratio!r}")
    if ownership not in _OWNERSHIPS:
        raise ValueError(f"{op}: ownership must be one of {_OWNERSHIPS}, got {ownership!r}")
    batch, height, width = labels.shape
    dev = labels.device
    if labels.numel() == 0:
        return torch.zeros_like(labels, dtype=torch.bool)
    lab = labels.long()
    if num_classes is None:
        labelled = lab[lab != ignore_index]
        if labelled.numel() and int(labelled.min()) < 0:
            raise ValueError(
                f"{op}: labels contain the value {int(labelled.min())}, negative and not ignore_index={ignore_index}"
            )
        num_classes = int(labelled.max()) + 1 if labelled.numel() else 1
    else:
        check_label_values(op, labels, num_classes, ignore_index)
    rows, cols = -(-height // patch_size), -(-width // patch_size)
    num_patches = batch * rows * cols
    valid = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)
    padded = F.pad(
        torch.where(valid, lab, num_classes),
        (0, cols * patch_size - width, 0, rows * patch_size - height),
        value=num_classes,
    )
    per_patch = padded.view(batch, rows, patch_size, cols, patch_size).permute(0, 1, 3, 2, 4)
    per_patch = per_patch.reshape(num_patches, patch_size * patch_size)
    hist = torch.zeros((num_patches, num_classes + 1), dtype=torch.int32, device=dev)
    hist.scatter_add_(1, per_patch, torch.ones_like(per_patch, dtype=torch.int32))
    image = torch.arange(batch, device=dev).repeat_interleave(rows * cols)
    no_group = batch * num_classes
    if ownership == "majority":
        votes, owner = hist[:, :num_classes].max(1)  # first maximum: ties go to the smallest class id
        group = torch.where(votes > 0, image * num_classes + owner, no_group)
        chosen = _choose_in_groups(group, no_group, ratio, generator).view(batch, rows, cols)
        pixels = chosen.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
        return pixels[:, :height, :width].contiguous()
    # "pixel": one candidate per (patch, class present in it); a chosen pair hides that class's pixels of the patch.
    patch_idx, cls = (hist[:, :num_classes] > 0).nonzero(as_tuple=True)
    chosen_pairs = _choose_in_groups(image[patch_idx] * num_classes + cls, no_group, ratio, generator)
    table = torch.zeros((num_patches, num_classes + 1), dtype=torch.bool, device=dev)  # column K: no class
    table[patch_idx[chosen_pairs], cls[chosen_pairs]] = True
    pixels = table.gather(1, per_patch)  # (patches, P * P): masked iff the patch was chosen for the pixel's class
    pixels = pixels.view(batch, rows, cols, patch_size, patch_size).permute(0, 1, 3, 2, 4)
    pixels = pixels.reshape(batch, rows * patch_size, cols * patch_size)
    return pixels[:, :height, :width].contiguous()
