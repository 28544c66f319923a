"""MiT encoder of SegFormer (Xie et al., NeurIPS 2021), MiT-B0..B5: timm has none, and SegFormer is what edge
deployments use. Its blocks are in `fastseg.layers.mit`; `fastseg.models.backbones.create_backbone("mit_b0")` builds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..layers.mit import MiTBlock, OverlapPatchEmbed
from ._base import Backbone

__all__ = ["MIT_CONFIGS", "MixTransformer"]

# MiT-B0..B5 (SegFormer, Xie et al. 2021, Table 6): widths, depths, heads; shared: sr ratios 8/4/2/1, MLP ratio 4.
MIT_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3), (1, 2, 5, 8)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3), (1, 2, 5, 8)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3), (1, 2, 5, 8)),
}


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
            self.embeds.append(OverlapPatchEmbed(prev, width, 7 if i == 0 else 3, 4 if i == 0 else 2))
            self.stages.append(
                nn.ModuleList(MiTBlock(width, head, sr, mlp_ratio, rates[cursor + j]) for j in range(depth))
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
