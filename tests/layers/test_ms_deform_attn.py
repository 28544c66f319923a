"""MSDeformAttn's grid_sample core against a naive per-point bilinear reference written from the definition."""

from __future__ import annotations

import math

import torch

from fastseg.layers.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_sample,
    reference_points,
)


def _naive(values, locations, weights):
    """Loop over every (batch, query, head, level, point): bilinear read at pixel (x W - 0.5, y H - 0.5), zero
    outside the map, weighted sum."""
    bsz, nq, heads, levels, points, _ = locations.shape
    head_dim = values[0].shape[1]
    out = torch.zeros(bsz, nq, heads, head_dim, dtype=torch.float64)
    for b in range(bsz):
        for q in range(nq):
            for h in range(heads):
                for lv in range(levels):
                    v = values[lv][b * heads + h].double()  # (d, H, W)
                    hh, ww = v.shape[-2:]
                    for p in range(points):
                        x = float(locations[b, q, h, lv, p, 0]) * ww - 0.5
                        y = float(locations[b, q, h, lv, p, 1]) * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(head_dim, dtype=torch.float64)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < hh and 0 <= xx < ww:
                                    acc += wy * wx * v[:, yy, xx]
                        out[b, q, h] += float(weights[b, q, h, lv, p]) * acc
    return out.reshape(bsz, nq, heads * head_dim)


def test_sampling_matches_naive_bilinear():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (2, 2)]
    bsz, heads, d, nq, points = 2, 2, 3, 4, 3
    values = [torch.randn(bsz * heads, d, h, w, generator=g) for h, w in shapes]
    locations = torch.rand(bsz, nq, heads, len(shapes), points, 2, generator=g) * 1.4 - 0.2  # some outside
    weights = torch.rand(bsz, nq, heads, len(shapes), points, generator=g)
    out = ms_deform_attn_sample(values, locations, weights)
    torch.testing.assert_close(out.double(), _naive(values, locations, weights), atol=1e-5, rtol=1e-5)


def test_module_shapes_gradients_and_zero_offsets_read_reference_pixels():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=1)
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 20, 16, requires_grad=True)
    query = torch.randn(1, 20, 16)
    ref = reference_points(shapes, value.device, value.dtype)
    out = attn(query, ref, value, shapes)
    assert out.shape == (1, 20, 16)
    out.sum().backward()
    assert value.grad is not None and torch.isfinite(value.grad).all()
    # zero offsets and one point per level: each query reads the value of its own pixel centre on its level
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    with torch.no_grad():
        maps = []
        proj = attn.value_proj(value)
        start = 0
        for h, w in shapes:
            maps.append(proj[:, start : start + h * w].view(1, h * w, 2, 8).permute(0, 2, 3, 1).reshape(2, 8, h, w))
            start += h * w
        loc = ref[None, :, None, None, None, :].expand(1, 20, 2, 2, 1, 2)
        w = torch.full((1, 20, 2, 2, 1), 0.5)
        expected = attn.output_proj(ms_deform_attn_sample(maps, loc, w))
        torch.testing.assert_close(attn(query, ref, value, shapes), expected)
