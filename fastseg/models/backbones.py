"""Backbones: timm encoders through ``features_only=True``, plus a MiT (SegFormer) encoder written here.

Every backbone returns a list of NCHW feature maps, one per stage, with ``.channels`` and ``.reductions``
describing them. Weights come from local files only (``checkpoint=...``); nothing is downloaded.

timm has no MiT / SegFormer encoder, and SegFormer is what edge deployments use, hence `MixTransformer`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Backbone", "create_backbone", "list_backbones", "MixTransformer"]

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

# MiT-B0..B5 (SegFormer, Xie et al. 2021, Table 6): widths, depths, heads; shared: sr ratios 8/4/2/1, MLP ratio 4.
_MIT_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3), (1, 2, 5, 8)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3), (1, 2, 5, 8)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3), (1, 2, 5, 8)),
}


def list_backbones() -> list[str]:
    return sorted(_TIMM_BACKBONES) + sorted(_MIT_CONFIGS)


class Backbone(nn.Module):
    """Common interface: ``forward(images) -> list of NCHW maps`` at ``reductions`` with ``channels``.

    ``divisible_by`` is the input multiple the encoder needs (the model pads to it).
    """

    channels: list[int]
    reductions: list[int]
    divisible_by: int = 32


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


class _OverlapPatchEmbed(nn.Module):
    def __init__(self, in_ch: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class _EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys / values come from a ``sr x sr``-strided reduction of the tokens."""

    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, sr, sr) if sr > 1 else None
        self.norm = nn.LayerNorm(dim) if sr > 1 else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _MixFFN(nn.Module):
    """Linear -> depthwise 3x3 conv (positional information without position embeddings) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class _MiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _EfficientSelfAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MixFFN(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Stochastic depth per sample (training only).
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x), h, w))
        return x + self._drop(self.mlp(self.norm2(x), h, w))


class MixTransformer(Backbone):
    """MiT encoder of SegFormer: four stages of overlapping patch embedding + efficient attention blocks.

    Stage strides 4, 8, 16, 32; the first embedding is a 7x7 stride-4 conv, the others 3x3 stride 2.
    """

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        heads: Sequence[int],
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        prev, cursor = in_chans, 0
        for i, (width, depth, head, sr) in enumerate(zip(widths, depths, heads, sr_ratios)):
            self.embeds.append(_OverlapPatchEmbed(prev, width, 7 if i == 0 else 3, 4 if i == 0 else 2))
            self.stages.append(
                nn.ModuleList(_MiTBlock(width, head, sr, mlp_ratio, rates[cursor + j]) for j in range(depth))
            )
            self.norms.append(nn.LayerNorm(width))
            prev, cursor = width, cursor + depth
        self.channels = list(widths)
        self.reductions = [4, 8, 16, 32]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats, x = [], images
        for embed, blocks, norm in zip(self.embeds, self.stages, self.norms):
            x, h, w = embed(x)
            for block in blocks:
                x = block(x, h, w)
            x = norm(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)
            feats.append(x)
        return feats


def create_backbone(name: str, checkpoint: str | os.PathLike | None = None, **kwargs) -> Backbone:
    """Build a backbone by fastseg name (see `list_backbones()`), optionally loading a local weights file."""
    if name in _TIMM_BACKBONES:
        return TimmBackbone(name, checkpoint=checkpoint, **kwargs)
    if name in _MIT_CONFIGS:
        widths, depths, heads = _MIT_CONFIGS[name]
        backbone = MixTransformer(widths, depths, heads, **kwargs)
        if checkpoint is not None:
            from ..checkpoint import load_weights

            load_weights(backbone, checkpoint)
        return backbone
    raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
