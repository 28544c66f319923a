"""Swin Transformer blocks (Liu et al., "Swin Transformer", ICCV 2021): (shifted-)window attention on NHWC maps.

Used by GSS's prior head and its learned inverse; generic (any dim / heads / window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwinStack", "WindowAttentionBlock"]


class WindowAttentionBlock(nn.Module):
    """Swin block (Liu et al. 2021): pre-LN (shifted-)window multi-head attention with relative position bias, then
    a GELU MLP. Works on (B, H, W, C); H and W are zero-padded to the window inside (as mmseg's Swin).

    Args:
        dim: channels C. heads: attention heads. window: window side. shift: cyclic shift (0 for W-MSA,
        ``window // 2`` for SW-MSA). mlp_ratio: MLP hidden width / C.
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int = 0, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"WindowAttentionBlock: dim {dim} is not divisible by heads {heads}")
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _shift_mask(self, hp: int, wp: int, device: torch.device) -> torch.Tensor:
        w, s = self.window, self.shift
        region = torch.zeros(hp, wp, device=device)
        cnt = 0
        for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
                region[hs, ws] = cnt
                cnt += 1
        win = region.view(hp // w, w, wp // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        diff = win[:, :, None] - win[:, None, :]
        return torch.where(diff != 0, torch.full_like(diff, -100.0), torch.zeros_like(diff))  # (nW, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w_, c = x.shape
        win = self.window
        shortcut = x
        x = self.norm1(x)
        pad_h, pad_w = (-h) % win, (-w_) % win
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w_ + pad_w
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        nwh, nww = hp // win, wp // win
        windows = x.view(b, nwh, win, nww, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nwh * nww, win * win, c)
        qkv = self.qkv(windows).reshape(-1, win * win, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        n = win * win
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n, n, self.heads).permute(2, 0, 1)[None]  # (1, heads, N, N)
        if self.shift:
            mask = self._shift_mask(hp, wp, x.device)  # (nW, N, N)
            bias = (bias + mask[:, None]).unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(-1, self.heads, n, n)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias.to(qkv.dtype))
        out = self.proj(out.transpose(1, 2).reshape(-1, n, c))
        out = out.view(b, nwh, nww, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if self.shift:
            out = torch.roll(out, (self.shift, self.shift), (1, 2))
        x = shortcut + out[:, :h, :w_]
        return x + self.mlp(self.norm2(x))


class SwinStack(nn.Module):
    """``depth`` blocks alternating W-MSA and SW-MSA, then a LayerNorm; NCHW in and out."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            WindowAttentionBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x).permute(0, 3, 1, 2)
