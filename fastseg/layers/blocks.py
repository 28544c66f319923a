"""Generic blocks shared by several heads: the one conv-norm-act, and a LayerNorm over the channels of a map."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChannelLayerNorm", "ConvNormAct"]

_NORMS = ("gn", "bn")


class ConvNormAct(nn.Module):
    """Conv2d (no bias) -> norm -> ReLU, the one conv-norm-act of fastseg (mmcv's ``ConvModule`` layout).

    Children are named as mmcv names them: ``conv``, then ``gn`` (GroupNorm) or ``bn`` (BatchNorm), so that official
    checkpoints (mmseg heads: ECENet, GSS) map key for key. GroupNorm is the default: batches are small on CPU and
    per GPU; the heads ported from mmseg use BatchNorm as their papers do.

    Args:
        in_channels, out_channels: channels.
        kernel_size: square kernel; padding ``dilation * (kernel_size // 2)`` keeps the size (at stride 1).
        stride, dilation, groups: as `nn.Conv2d`.
        norm: ``"gn"`` or ``"bn"``.
        gn_groups: GroupNorm groups (1 when ``out_channels`` is not divisible by it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: str = "gn",
        gn_groups: int = 8,
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"ConvNormAct: norm must be one of {_NORMS}, got {norm!r}")
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.norm_name = norm
        if norm == "gn":
            self.gn = nn.GroupNorm(gn_groups if out_channels % gn_groups == 0 else 1, out_channels)
        else:
            self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(getattr(self, self.norm_name)(self.conv(x)), inplace=True)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (per pixel), as ECENet normalises pixel features."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
