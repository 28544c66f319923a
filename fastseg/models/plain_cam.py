"""The plain CAM baseline of weakly supervised segmentation: a CNN image classifier whose class maps are its CAMs.

A ResNet trunk at output stride 8 (dilated last stages, timm's ``output_stride=8``), a 1x1 convolution to one map
per foreground class, and global average pooling of the maps as the image-level logits (Zhou et al.'s CAM, with
the classifier moved before the pooling so the maps are the logits' spatial terms). Trained with the multilabel
soft-margin loss on image-level labels only.

It offers the part of the WeakTr interface that CAM inference uses (`fastseg.engine.recipes.semples`):
``forward_cams(images)["coarse"]`` and ``["coarse_logits"]``, ``num_cam_classes`` and ``patch_size`` (the stride
the inputs are rounded to). It is not a registered segmentation model: its only output is the CAMs.

Why a CNN and not the WeakTr ViT with GAP (the ``plain_cam_vit`` arm of the shapes experiment): on the shapes world
a small ViT's GAP classifier learns the shape -> texture co-occurrence first and its head fires on the preferred
texture rather than on the shape (measured: mean CAM 0.45 on the texture, 0.19 on the shape), while the CNN's
convolutional maps stay local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone

__all__ = ["PlainCAM"]


class PlainCAM(nn.Module):
    """GAP classifier with a 1x1 CAM head on a stride-8 CNN trunk (see the module docstring)."""

    def __init__(self, num_cam_classes: int = 8, backbone: str = "resnet18", output_stride: int = 8) -> None:
        super().__init__()
        if num_cam_classes < 1:
            raise ValueError(f"PlainCAM needs at least one foreground class, got {num_cam_classes}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.backbone = create_backbone(backbone, output_stride=output_stride)
        self.head = nn.Conv2d(self.backbone.channels[-1], num_cam_classes, kernel_size=1)
        self.num_cam_classes = num_cam_classes
        self.patch_size = output_stride

    def forward_cams(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        cams = self.head(self.backbone(images)[-1])
        return {"coarse": cams, "coarse_logits": cams.mean((2, 3))}

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Multilabel soft-margin loss of the pooled maps against ``batch["image_labels"]`` ``(B, K)``."""
        labels = batch["image_labels"]
        if labels.dim() != 2 or labels.shape[1] != self.num_cam_classes:
            raise ValueError(f"image_labels must have shape (B, {self.num_cam_classes}), got {tuple(labels.shape)}")
        logits = self.forward_cams(batch["image"])["coarse_logits"]
        return {"loss": F.multilabel_soft_margin_loss(logits, (labels > 0).float())}
