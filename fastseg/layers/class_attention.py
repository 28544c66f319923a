"""Class->pixel attention layers over the fused `masked_class_attention` op.

* `MaskedCrossAttentionLayer`: Mask2Former's masked cross-attention layer (queries attend to the pixels of their
  previous predicted mask), with `attention_mask_from_logits` building the mask the way Mask2Former does.

Parameter names follow Mask2Former's checkpoints (``multihead_attn.in_proj_weight``, ``out_proj``, ``norm``) so that
converters map keys one to one. ECENet's pixel->class attention block, which is specific to that method, lives in
`fastseg.models.ecenet` (over the fused `pixel_class_attention` op).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastseg.kernels import masked_class_attention

__all__ = ["MaskedCrossAttentionLayer", "attention_mask_from_logits"]


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
        raise ValueError(
            f"attention_mask_from_logits: mask_logits must be (B, Q, H, W), got {tuple(mask_logits.shape)}"
        )
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
        self,
        d_model: int = 256,
        num_heads: int = 8,
        dropout: float = 0.0,
        normalize_before: bool = False,
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

        q, k, v = (
            split_heads(F.linear(t, w, b)) for t, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v))
        )
        out = masked_class_attention(q, k, v, mask, scale=1.0 / math.sqrt(head_dim), impl=self.impl)
        return self.multihead_attn.out_proj(out.transpose(1, 2).reshape(bsz, num_q, self.d_model))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        mask: Tensor | None = None,
        pos: Tensor | None = None,
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
