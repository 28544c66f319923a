"""Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019): the supervised baseline.

Every method in fastseg is compared with this head on the same backbone and budget. Data flow: backbone levels at
strides 4..32 -> 1x1 laterals -> top-down sums -> 3x3 smoothing -> per level, (3x3 conv + GroupNorm + ReLU + 2x
upsample) repeated until stride 4 -> sum -> dropout -> 1x1 classifier. Logits at stride 4.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.blocks import ConvNormAct
from ..registry import register_model
from ._base import SegmentationModel, resize, resolve_cfg
from .backbones import create_backbone

__all__ = ["FPNSegmenter"]


class FPNSegmenter(SegmentationModel):
    """Backbone + semantic FPN head.

    Args:
        backbone: fastseg backbone name (`fastseg.models.backbones.list_backbones()`).
        num_classes: number of classes K (default: the shapes world's).
        fpn_channels: width of the pyramid.
        head_channels: width of the per-level upsampling branches.
        dropout: dropout before the classifier.
        backbone_checkpoint: local weights file for the backbone.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        fpn_channels: int = 128,
        head_channels: int = 64,
        dropout: float = 0.1,
        backbone_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, checkpoint=backbone_checkpoint)
        self.pretrained_cfg = resolve_cfg(
            num_classes, output_stride=self.backbone.reductions[0], divisible_by=self.backbone.divisible_by
        )
        self.laterals = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in self.backbone.channels)
        self.smooth = nn.ModuleList(nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1) for _ in self.backbone.channels)
        base = self.backbone.reductions[0]
        self.branches = nn.ModuleList()
        for reduction in self.backbone.reductions:
            steps = max(1, (reduction // base).bit_length() - 1)  # number of 2x upsamplings to reach stride `base`
            layers: list[nn.Module] = []
            for i in range(steps):
                layers.append(ConvNormAct(fpn_channels if i == 0 else head_channels, head_channels, 3))
                if reduction > base:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.branches.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, self.num_classes, 1)

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)
        lat = [conv(f) for conv, f in zip(self.laterals, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down pathway
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        pyramid = [conv(x) for conv, x in zip(self.smooth, lat)]
        size = pyramid[0].shape[-2:]
        fused = None
        for branch, level in zip(self.branches, pyramid):
            out = branch(level)
            if out.shape[-2:] != size:  # non power-of-two sizes
                out = resize(out, size)
            fused = out if fused is None else fused + out
        return self.classifier(self.dropout(fused))


def _fpn(backbone: str, **kwargs) -> FPNSegmenter:
    return FPNSegmenter(backbone=backbone, **kwargs)


# Shrunk CPU configurations carry the tag SHAPES_SMALL (``fpn_resnet18.shapes_small``) and what differs from the paper.
SHAPES_SMALL = "shapes_small"
_SMALL_FPN = "pyramid width 128 and head width 64 (paper: 256 / 128), for the 64 x 64 shapes world"


@register_model(tag=SHAPES_SMALL, differs_from_paper=f"{_SMALL_FPN}; ResNet-18 is not a backbone of the paper")
def fpn_resnet18(**kwargs) -> FPNSegmenter:
    """Semantic FPN on ResNet-18 (the CPU-trainable baseline)."""
    return _fpn("resnet18", **kwargs)


@register_model
def fpn_resnet50(**kwargs) -> FPNSegmenter:
    """Semantic FPN on ResNet-50, pyramid width 256 as in the paper."""
    kwargs.setdefault("fpn_channels", 256)
    kwargs.setdefault("head_channels", 128)
    return _fpn("resnet50", **kwargs)


@register_model
def fpn_resnet101(**kwargs) -> FPNSegmenter:
    """Semantic FPN on ResNet-101, pyramid width 256 as in the paper."""
    kwargs.setdefault("fpn_channels", 256)
    kwargs.setdefault("head_channels", 128)
    return _fpn("resnet101", **kwargs)


@register_model
def fpn_swin_tiny(**kwargs) -> FPNSegmenter:
    """Semantic FPN on Swin-T."""
    kwargs.setdefault("fpn_channels", 256)
    kwargs.setdefault("head_channels", 128)
    return _fpn("swin_tiny", **kwargs)


@register_model(tag=SHAPES_SMALL, differs_from_paper=_SMALL_FPN)
def fpn_mit_b0(**kwargs) -> FPNSegmenter:
    """Semantic FPN on MiT-B0 (SegFormer's smallest encoder; an edge-deployment configuration)."""
    return _fpn("mit_b0", **kwargs)
