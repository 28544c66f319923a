"""Attention layers between class embeddings and pixels, over `fastseg.kernels.pixel_class_attention` and
`fastseg.kernels.masked_class_attention`.

* `ECENetSemanticsAttention` / `ECENetTransferBlock`: ECENet's pixel->class cross-attention (spec gss_ecenet.md
  B.3.2). Pixels are queries, the K class embeddings keys / values; softmax over classes of the *negated* logits;
  the head-mean of the scaled positive-sense logits is the stage mask.
* `MaskedCrossAttentionLayer`: Mask2Former's masked cross-attention layer (queries attend to the pixels of their
  previous predicted mask), with `attention_mask_from_logits` building the mask the way Mask2Former does.

Module and parameter names follow the original checkpoints (ECENet's ``transfer.{i}.cross_attn.q.depthwise_conv.conv``,
``kv``, ``proj``, ``norm_low`` ... ; Mask2Former's ``multihead_attn.in_proj_weight``, ``out_proj``, ``norm``) so that
converters map keys one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastseg.kernels import masked_class_attention, pixel_class_attention

__all__ = [
    "ChannelLayerNorm",
    "ECENetSemanticsAttention",
    "ECENetTransferBlock",
    "MaskedCrossAttentionLayer",
    "attention_mask_from_logits",
]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (per pixel), as ECENet normalises pixel features."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvHolder(nn.Module):
    """mmcv's ConvModule without norm / activation: only ``.conv`` (keeps checkpoint keys ``*.conv.weight``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, both with bias, no norm, no activation (mmcv ``act_cfg=None``; spec B.3.2
    notes that one port silently adds a ReLU -- mmcv semantics are followed here)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise_conv = _ConvHolder(nn.Conv2d(channels, channels, 3, padding=1, groups=channels))
        self.pointwise_conv = _ConvHolder(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class ECENetSemanticsAttention(nn.Module):
    """ECENet's pixel->class cross-attention (``cross_attn``), one fused op for attention + stage mask.

    ``Q = pointwise(depthwise3x3(x))``; ``[K | V] = Linear(C, 2C, bias=False)(e)``; head ``h`` owns channels
    ``[h*d, (h+1)*d)`` of Q, K and V; ``A = Q K^T * d**-0.5``; weights ``softmax(rowmax(A) - A) = softmax(-A)`` over
    the classes; ``out = proj(weights @ V)`` (1x1 conv with bias, heads concatenated); ``mask = mean_h A`` reshaped to
    (B, K, H, W). The inputs are expected to be LayerNorm-ed already (see `ECENetTransferBlock`); no residual here.

    Args:
        channels: C (256 in ECENet).
        num_heads: heads (4 in ECENet); C must be divisible by it.
        impl: kernel implementation, passed to `fastseg.kernels.pixel_class_attention`.
    """

    def __init__(self, channels: int = 256, num_heads: int = 4, impl: str = "auto") -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels, self.num_heads, self.impl = channels, num_heads, impl
        self.scale = (channels // num_heads) ** -0.5
        self.q = _DepthwiseSeparableConv(channels)
        self.kv = nn.Linear(channels, 2 * channels, bias=False)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """Args: x (B, C, H, W) pixel features; classes (B, K, C) class embeddings.
        Returns: out (B, C, H, W) (before the residual) and the stage mask (B, K, H, W)."""
        if x.dim() != 4 or classes.dim() != 3 or x.shape[1] != self.channels or classes.shape[-1] != self.channels:
            raise ValueError(
                f"ECENetSemanticsAttention: expected x (B, {self.channels}, H, W) and classes (B, K, {self.channels}), "
                f"got {tuple(x.shape)} and {tuple(classes.shape)}"
            )
        bsz, channels, height, width = x.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        q = self.q(x).flatten(2).view(bsz, heads, head_dim, height * width).transpose(2, 3)  # (B, h, N, d)
        k, v = self.kv(classes).view(bsz, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # each (B, h, K, d)
        out, mean = pixel_class_attention(
            q, k, v, scale=self.scale, negate=True, return_logits_mean=True, impl=self.impl
        )
        out = out.transpose(2, 3).reshape(bsz, channels, height, width)
        return self.proj(out), mean.view(bsz, -1, height, width)


class ECENetTransferBlock(nn.Module):
    """One ECENet stage update of pixel features (``transfer.{i}``): attention + residual, then MixFFN + residual.

    ``a, mask = cross_attn(norm_low(x), norm_high(e)); x = x + a; x = x + mlp(norm_mlp(x))`` with
    ``mlp = 1x1 C->4C, dw3x3 4C, GELU, Dropout, 1x1 4C->C`` (indices 0, 1, 4 carry weights, as in the checkpoint).
    Which of ``norm_low`` / ``norm_high`` normalises pixels vs classes is our reading of the port (pixels are the
    "low" level); swap them when converting weights if the original proves otherwise.
    """

    def __init__(
        self, channels: int = 256, num_heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0, impl: str = "auto"
    ) -> None:
        super().__init__()
        hidden = channels * mlp_ratio
        self.norm_low = ChannelLayerNorm(channels)
        self.norm_high = nn.LayerNorm(channels)
        self.cross_attn = ECENetSemanticsAttention(channels, num_heads, impl)
        self.norm_mlp = ChannelLayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the updated pixel features (B, C, H, W) and the stage mask (B, K, H, W)."""
        attended, mask = self.cross_attn(self.norm_low(x), self.norm_high(classes))
        x = x + attended
        return x + self.mlp(self.norm_mlp(x)), mask


def attention_mask_from_logits(mask_logits: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Mask2Former's attention mask from the previous layer's mask logits, in fastseg's sense (True = attend).

    Mask2Former: ``attn_mask = sigmoid(interpolate(logits, size, bilinear)) < 0.5`` (True = blocked), detached.
    Here the complement, ``sigmoid(...) >= 0.5``, is returned as (B, Q, h*w); empty rows are left empty --
    `fastseg.kernels.masked_class_attention` lets such queries attend everywhere, as Mask2Former does.

    Args:
        mask_logits: (B, Q, H, W) predicted mask logits.
        size: the (h, w) of the attended feature map; None keeps (H, W).
    """
    if mask_logits.dim() != 4:
        raise ValueError(f"attention_mask_from_logits: mask_logits must be (B, Q, H, W), got {tuple(mask_logits.shape)}")
    logits = mask_logits.detach()
    if size is not None and tuple(size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return (logits.sigmoid() >= 0.5).flatten(2)


class _MultiheadAttentionWeights(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` (same names, same init) without its attention code."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)


class MaskedCrossAttentionLayer(nn.Module):
    """Mask2Former's masked cross-attention layer (``CrossAttentionLayer``), batch-first.

    ``q = W_q (tgt + query_pos)``, ``k = W_k (memory + pos)``, ``v = W_v memory`` (positional embeddings go to q and
    k only), multi-head `masked_class_attention`, output projection, then post-norm
    ``norm(tgt + dropout(attn))`` (Mask2Former's default) or pre-norm ``tgt + dropout(attn(norm(tgt)))``.
    Mask2Former's decoder uses dropout 0; the ``dropout`` here is the residual dropout -- attention-weight dropout
    (``nn.MultiheadAttention(dropout=...)``) is not part of the fused kernel.

    Args:
        d_model: embedding width C (256).
        num_heads: heads (8); C must be divisible by it.
        dropout: residual dropout probability.
        normalize_before: pre-norm instead of post-norm.
        impl: kernel implementation, passed to `fastseg.kernels.masked_class_attention`.
    """

    def __init__(
        self, d_model: int = 256, num_heads: int = 8, dropout: float = 0.0, normalize_before: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model, self.num_heads, self.impl = d_model, num_heads, impl
        self.normalize_before = normalize_before
        self.multihead_attn = _MultiheadAttentionWeights(d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        bsz, num_q, _ = query.shape
        heads, head_dim = self.num_heads, self.d_model // self.num_heads
        w_q, w_k, w_v = self.multihead_attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.multihead_attn.in_proj_bias.chunk(3)

        def split_heads(t: Tensor) -> Tensor:  # (B, L, C) -> (B, h, L, d)
            return t.view(bsz, t.shape[1], heads, head_dim).transpose(1, 2)

        q, k, v = (split_heads(F.linear(t, w, b)) for t, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        out = masked_class_attention(q, k, v, mask, scale=1.0 / math.sqrt(head_dim), impl=self.impl)
        return self.multihead_attn.out_proj(out.transpose(1, 2).reshape(bsz, num_q, self.d_model))

    def forward(
        self, tgt: Tensor, memory: Tensor, mask: Tensor | None = None, pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """Args:
            tgt: queries (B, Q, C).
            memory: pixel features (B, N, C).
            mask: bool (B, Q, N), True = attend (`attention_mask_from_logits`), or None.
            pos: pixel positional embeddings (B, N, C), added to the keys.
            query_pos: query positional embeddings (B, Q, C), added to the queries.

        Returns: updated queries (B, Q, C).
        """
        if tgt.dim() != 3 or memory.dim() != 3 or tgt.shape[-1] != self.d_model or memory.shape[-1] != self.d_model:
            raise ValueError(
                f"MaskedCrossAttentionLayer: expected tgt (B, Q, {self.d_model}) and memory (B, N, {self.d_model}), "
                f"got {tuple(tgt.shape)} and {tuple(memory.shape)}"
            )
        key = memory if pos is None else memory + pos
        if self.normalize_before:
            normed = self.norm(tgt)
            query = normed if query_pos is None else normed + query_pos
            return tgt + self.dropout(self._attend(query, key, memory, mask))
        query = tgt if query_pos is None else tgt + query_pos
        return self.norm(tgt + self.dropout(self._attend(query, key, memory, mask)))
