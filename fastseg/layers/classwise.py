"""S4MIM building blocks over the `classwise` kernels: the class-wise masked input builder, the class-wise masked
reconstruction loss and the masked/visible feature aggregation loss.

S4MIM's method section and code are not public (specs/pading_semples_s4mim.md, E.2). What follows is **our
interpretation** of the abstract (E.4), with the unknown choices exposed as options so that the paper's real ones can
be dropped in:

* masking unit and ratio (``patch_size``, ``ratio``), pixel-level masking within a patch's class or whole patches
  owned by their majority class (``ownership``, see `fastseg.layers.masking.classwise_patch_mask`), fill of masked pixels (zeros, the per-image mean, or a learned token);
* one masked image per input with a per-class loss (the "cheaper variant" of E.4.2: context from other classes is
  not removed from the input, only from the loss);
* aggregation distance (``"cosine"`` or ``"mse"``) between the masked-part prototype and the **stop-gradient**
  visible-part prototype of each (image, class); groups where either part is empty do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseg.kernels import classwise_masked_recon_loss, classwise_mean, classwise_reduce
from fastseg.layers.masking import classwise_patch_mask

__all__ = ["ClasswiseFeatureAggregationLoss", "ClasswiseMaskedInput", "ClasswiseMaskedReconLoss", "resize_labels"]

_FILLS = ("zero", "mean", "token")
_DISTANCES = ("cosine", "mse")


def resize_labels(
    labels: torch.Tensor, masked: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour resize of a class map and its mask to a feature map's ``size`` (no-op when equal)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels, masked
    stacked = torch.stack([labels.long(), masked.long()], 1).float()  # nearest keeps integer values exactly
    resized = F.interpolate(stacked, size=size, mode="nearest").long()
    return resized[:, 0].to(labels.dtype), resized[:, 1].bool()


class ClasswiseMaskedInput(nn.Module):
    """Mask a random ``ratio`` of the patches of every class region and fill the masked pixels.

    Args:
        patch_size: masking unit in pixels (input resolution).
        ratio: fraction of each class region's patches to mask.
        fill: ``"zero"`` (0 after normalisation, i.e. the dataset mean), ``"mean"`` (each image's channel mean) or
            ``"token"`` (a learned per-channel value, MAE/SimMIM style).
        in_channels: image channels (for the token).
        ignore_index: unlabelled pixels; patches made only of them are never masked.
        ownership: ``"pixel"`` (a chosen patch hides only its class's pixels) or ``"majority"`` (a patch belongs to
            its majority class and hides all its pixels).

    Forward: ``(images (B, C, H, W), labels (B, H, W), generator=None) -> (masked_images, masked (B, H, W) bool)``.
    """

    def __init__(
        self,
        patch_size: int = 16,
        ratio: float = 0.5,
        fill: str = "zero",
        in_channels: int = 3,
        ignore_index: int = 255,
        ownership: str = "pixel",
    ) -> None:
        super().__init__()
        if fill not in _FILLS:
            raise ValueError(f"ClasswiseMaskedInput: fill must be one of {_FILLS}, got {fill!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ClasswiseMaskedInput: ratio must lie in [0, 1], got {ratio!r}")
        if ownership not in ("pixel", "majority"):
            raise ValueError(f"ClasswiseMaskedInput: ownership must be 'pixel' or 'majority', got {ownership!r}")
        self.patch_size, self.ratio, self.fill, self.ignore_index = patch_size, ratio, fill, ignore_index
        self.ownership = ownership
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, 1, 1)) if fill == "token" else None

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or labels.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"ClasswiseMaskedInput: images (B, C, H, W) and labels (B, H, W) must agree, got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        masked = classwise_patch_mask(
            labels,
            self.patch_size,
            self.ratio,
            generator=generator,
            ignore_index=self.ignore_index,
            ownership=self.ownership,
        )
        if self.fill == "zero":
            fill = images.new_zeros(())
        elif self.fill == "mean":
            fill = images.mean((2, 3), keepdim=True)
        else:
            fill = self.mask_token.to(images.dtype)
        return torch.where(masked.unsqueeze(1), fill, images), masked

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, ratio={self.ratio}, fill={self.fill!r}, ownership={self.ownership!r}"


class ClasswiseMaskedReconLoss(nn.Module):
    """`fastseg.kernels.classwise_masked_recon_loss` as a module: the mean over present (image, class) groups of the
    MSE over the masked pixels of the class.

    Forward: ``(pred, target, labels, masked) -> total`` (a scalar); ``pred`` may be at a lower resolution than
    ``target`` and is then bilinearly upsampled first.
    """

    def __init__(
        self,
        num_classes: int,
        normalize_target: bool = True,
        patch_size: int = 16,
        ignore_index: int = 255,
        deterministic: bool | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.num_classes, self.normalize_target, self.patch_size = num_classes, normalize_target, patch_size
        self.ignore_index, self.deterministic, self.impl = ignore_index, deterministic, impl

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor
    ) -> torch.Tensor:
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
        _, total = classwise_masked_recon_loss(
            pred,
            target,
            labels,
            masked,
            self.num_classes,
            self.ignore_index,
            normalize_target=self.normalize_target,
            patch_size=self.patch_size,
            deterministic=self.deterministic,
            impl=self.impl,
        )
        return total


class ClasswiseFeatureAggregationLoss(nn.Module):
    """Pull each class's masked-part feature prototype towards its stop-gradient visible-part prototype.

    For every (image b, class k) with both parts non-empty, ``mu_m`` / ``mu_v`` are the mean features over the
    masked / visible pixels of class k (`classwise_reduce` + `classwise_mean`, one read of the features) and

    * ``"cosine"``: ``d = 1 - cos(mu_m, sg(mu_v))`` (cosine with eps 1e-8 on the norms),
    * ``"mse"``: ``d = mean_c (mu_m - sg(mu_v))^2``;

    the loss is the mean of ``d`` over those groups (0 with zero gradient when there is none). Labels and mask
    given at image resolution are resized to the feature map by nearest neighbour.

    Forward: ``(features (B, C, h, w), labels (B, H, W), masked (B, H, W)) -> loss``.
    """

    def __init__(
        self,
        num_classes: int,
        distance: str = "cosine",
        ignore_index: int = 255,
        deterministic: bool | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if distance not in _DISTANCES:
            raise ValueError(f"ClasswiseFeatureAggregationLoss: distance must be one of {_DISTANCES}, got {distance!r}")
        self.num_classes, self.distance, self.ignore_index = num_classes, distance, ignore_index
        self.deterministic, self.impl = deterministic, impl

    def forward(self, features: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        labels, masked = resize_labels(labels, masked, tuple(features.shape[-2:]))
        sums, counts = classwise_reduce(
            features,
            labels,
            masked,
            self.num_classes,
            self.ignore_index,
            deterministic=self.deterministic,
            impl=self.impl,
        )
        means = classwise_mean(sums, counts)
        visible, masked_part = means[:, :, 0].detach(), means[:, :, 1]
        both = (counts > 0).all(-1)  # (B, K): both parts present
        if self.distance == "cosine":
            dist = 1.0 - F.cosine_similarity(masked_part, visible, dim=-1, eps=1e-8)
        else:
            dist = (masked_part - visible).square().mean(-1)
        dist = torch.where(both, dist, 0.0)
        return dist.sum() / both.sum().clamp(min=1).to(dist.dtype)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, distance={self.distance!r}"
