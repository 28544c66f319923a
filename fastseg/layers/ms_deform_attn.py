"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021) in plain PyTorch via ``grid_sample``.

Each query owns a reference point ``p`` (normalised to [0, 1]) on every level. Per head ``h``, level ``l`` and point
``k`` a linear layer predicts an offset ``o_hlk`` (in pixels of level ``l``) and a weight ``a_hlk`` (softmax over the
``L * P`` samples of the head). The head's output is::

    out_h(q) = sum_{l, k} a_hlk(q) * V_hl(p(q) + o_hlk(q) / (W_l, H_l))

where ``V_hl`` is the value map of level ``l`` (head-``h`` channels) read with bilinear interpolation and zero
padding outside the map, i.e. ``grid_sample(align_corners=False, padding_mode="zeros")`` -- the sampling rule of the
official CUDA kernel (pixel centres at ``(i + 0.5) / W``). The official op is a custom CUDA kernel; this is the same
maths through standard ops, which exports to ONNX (``GridSample``) and runs anywhere. Cost: one ``grid_sample`` per
level over (B * heads) maps; memory ``O(B * Nq * heads * L * P * head_dim)`` for the gathered samples.

Module and parameter names follow the official ``MSDeformAttn`` (``sampling_offsets``, ``attention_weights``,
``value_proj``, ``output_proj``) so checkpoints map key for key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "ms_deform_attn_sample", "reference_points"]


def ms_deform_attn_sample(values: Sequence[Tensor], sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The core sum of sampled values.

    Args:
        values: per level ``(B * heads, head_dim, H_l, W_l)`` value maps.
        sampling_locations: ``(B, Nq, heads, L, P, 2)`` (x, y) in [0, 1] (outside reads zeros).
        attention_weights: ``(B, Nq, heads, L, P)``, already normalised over ``L * P``.

    Returns:
        ``(B, Nq, heads * head_dim)``.
    """
    bsz, num_q, heads, levels, _, _ = sampling_locations.shape
    if len(values) != levels:
        raise ValueError(f"ms_deform_attn_sample: {len(values)} value maps for {levels} levels")
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    sampled = []
    for level, value in enumerate(values):
        # (B, Nq, heads, P, 2) -> (B * heads, Nq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    # each (B * heads, head_dim, Nq, P) -> stack over levels: (B * heads, head_dim, Nq, L, P)
    stacked = torch.stack(sampled, dim=3)
    weights = attention_weights.transpose(1, 2).flatten(0, 1)[:, None]  # (B * heads, 1, Nq, L, P)
    out = (stacked * weights).sum(dim=(3, 4))  # (B * heads, head_dim, Nq)
    head_dim = out.shape[1]
    return out.view(bsz, heads * head_dim, num_q).transpose(1, 2)


def reference_points(shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Pixel-centre reference points of every level, flattened in level order: ``(sum H_l W_l, 2)`` (x, y) in (0, 1)."""
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1))
    return torch.cat(points, dim=0)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (see the module docstring for the maths).

    Args:
        d_model: channels C (256 in Mask2Former).
        n_levels: feature levels L (3 in Mask2Former's pixel decoder).
        n_heads: heads (8); C must be divisible by it.
        n_points: sampling points P per head and level (4).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's init: offsets start on a ring of directions (one per head), growing with the point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        ref_points: Tensor,
        value: Tensor,
        shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Args:
            query: ``(B, Nq, C)`` queries (with positional embeddings added).
            ref_points: ``(B, Nq, L, 2)`` or ``(Nq, 2)`` reference points (x, y) in [0, 1].
            value: ``(B, sum H_l W_l, C)`` flattened features of all levels, in level order.
            shapes: the ``(H_l, W_l)`` of each level (Python ints, so export sees static splits).
            padding_mask: optional bool ``(B, sum H_l W_l)``, True where the value is padding (zeroed).

        Returns: ``(B, Nq, C)``.
        """
        bsz, num_q, channels = query.shape
        if channels != self.d_model or value.shape[-1] != self.d_model:
            raise ValueError(
                f"MSDeformAttn: expected query and value with {self.d_model} channels, got "
                f"{tuple(query.shape)} and {tuple(value.shape)}"
            )
        if len(shapes) != self.n_levels or sum(h * w for h, w in shapes) != value.shape[1]:
            raise ValueError(
                f"MSDeformAttn: level shapes {list(shapes)} do not match value {tuple(value.shape)} "
                f"with {self.n_levels} levels"
            )
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        head_dim = channels // heads
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        maps = []
        start = 0
        for h, w in shapes:
            level = value[:, start : start + h * w]  # (B, HW, C)
            start += h * w
            maps.append(
                level.view(bsz, h * w, heads, head_dim).permute(0, 2, 3, 1).reshape(bsz * heads, head_dim, h, w)
            )
        offsets = self.sampling_offsets(query).view(bsz, num_q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(bsz, num_q, heads, levels * points).softmax(-1)
        weights = weights.view(bsz, num_q, heads, levels, points)
        normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        if ref_points.dim() == 2:
            ref_points = ref_points[None, :, None].expand(bsz, num_q, levels, 2)
        locations = ref_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_sample(maps, locations, weights))
