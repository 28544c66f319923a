"""Small shared blocks used by several heads."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["ConvNormAct"]


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> GroupNorm -> ReLU. GroupNorm rather than BatchNorm: batches are small on CPU and per-GPU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, groups_norm: int = 8) -> None:
        groups = groups_norm if out_channels % groups_norm == 0 else 1
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )
