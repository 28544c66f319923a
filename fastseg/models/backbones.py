"""Backbones by fastseg name: timm encoders through ``features_only=True`` (the adapter), and the MiT encoder of
`fastseg.models.mit` (timm has none).

Every backbone returns a list of NCHW feature maps, one per stage, with ``.channels`` and ``.reductions``
describing them (the `Backbone` interface). Weights come from local files only (``checkpoint=...``); nothing is
downloaded.
"""

from __future__ import annotations

import os

import timm
import torch

from ._base import Backbone
from .mit import MIT_CONFIGS, MixTransformer

__all__ = ["Backbone", "MixTransformer", "TimmBackbone", "create_backbone", "list_backbones"]

# fastseg name -> (timm name, out_indices giving strides 4, 8, 16, 32)
_TIMM_BACKBONES: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("resnet18", (1, 2, 3, 4)),
    "resnet34": ("resnet34", (1, 2, 3, 4)),
    "resnet50": ("resnet50", (1, 2, 3, 4)),
    "resnet101": ("resnet101", (1, 2, 3, 4)),
    "swin_tiny": ("swin_tiny_patch4_window7_224", (0, 1, 2, 3)),
    "swin_small": ("swin_small_patch4_window7_224", (0, 1, 2, 3)),
    "swin_base": ("swin_base_patch4_window12_384", (0, 1, 2, 3)),
    "swin_large": ("swin_large_patch4_window12_384", (0, 1, 2, 3)),
}


def list_backbones() -> list[str]:
    return sorted(_TIMM_BACKBONES) + sorted(MIT_CONFIGS)


class TimmBackbone(Backbone):
    def __init__(self, name: str, checkpoint: str | os.PathLike | None = None, **kwargs) -> None:
        super().__init__()
        timm_name, out_indices = _TIMM_BACKBONES[name]
        extra = dict(kwargs)
        if name.startswith("swin"):
            # Accept any input that is a multiple of 32 rather than only the pre-training size.
            extra.setdefault("strict_img_size", False)
            extra.setdefault("img_size", 224)
        if checkpoint is not None:
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"backbone checkpoint {checkpoint} does not exist")
            # timm reads a local file through `pretrained_cfg_overlay`; no network access.
            extra["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
        self.body = timm.create_model(
            timm_name, pretrained=checkpoint is not None, features_only=True, out_indices=out_indices, **extra
        )
        self.channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())
        self.channels_last_output = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(images)
        if self.channels_last_output:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)


def create_backbone(name: str, checkpoint: str | os.PathLike | None = None, **kwargs) -> Backbone:
    """Build a backbone by fastseg name (see `list_backbones()`), optionally loading a local weights file."""
    if name in _TIMM_BACKBONES:
        return TimmBackbone(name, checkpoint=checkpoint, **kwargs)
    if name in MIT_CONFIGS:
        widths, depths, heads = MIT_CONFIGS[name]
        backbone = MixTransformer(widths, depths, heads, **kwargs)
        if checkpoint is not None:
            from ..checkpoint import load_weights

            load_weights(backbone, checkpoint)
        return backbone
    raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
