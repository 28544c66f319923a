"""Benchmark case: one Mask2Former decoder layer at the official shapes (issue 15).

One layer = masked cross-attention (`MaskedCrossAttentionLayer`: q / k / v projections, multi-head masked attention,
output projection, residual, LayerNorm) -> self-attention -> FFN, as `fastseg.models.mask2former` runs it, with
B = 2 (the official per-GPU training batch), Q = 100 queries, C = 256, 8 heads (d = 32), FFN 2048, and the three
memories the decoder cycles through at 512 x 512 input: 1/32, 1/16, 1/8 (N = 16², 32², 64² pixels). The mask is
random with some empty rows.

Providers differ only in the attention: ``triton`` (fastseg's fused ``masked_class_attention``), ``torch`` (its
plain reference), ``sdpa`` (``F.scaled_dot_product_attention`` with the boolean mask after Mask2Former's empty-row
fix-up, what one would write without fastseg). Modes ``fwd`` and ``fwd_bwd`` (gradients of the queries and the
memory). ``flops`` counts the layer's matmuls; ``min_bytes`` the activations and weights read and written once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastseg.bench.core import KernelCase, register_kernel_cases, require_triton
from fastseg.layers.class_attention import MaskedCrossAttentionLayer
from fastseg.models.mask2former import FFNLayer, SelfAttentionLayer

FAMILY = "mask2former_layer"
SIDES = (16, 32, 64)  # 1/32, 1/16, 1/8 of 512


class _DecoderLayer(torch.nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross = MaskedCrossAttentionLayer(dim, heads)
        self.self_attn = SelfAttentionLayer(dim, heads, 0.0)
        self.ffn = FFNLayer(dim, ffn, 0.0)

    def forward(self, tgt, memory, mask, pos, query_pos, attention: str):
        if attention == "sdpa":
            cross = self._sdpa_cross(tgt, memory, mask, pos, query_pos)
        else:
            self.cross.impl = attention
            cross = self.cross(tgt, memory, mask, pos, query_pos)
        return self.ffn(self.self_attn(cross, query_pos))

    def _sdpa_cross(self, tgt, memory, mask, pos, query_pos):
        layer = self.cross
        bsz, num_q, dim = tgt.shape
        heads, head_dim = layer.num_heads, dim // layer.num_heads
        w_q, w_k, w_v = layer.multihead_attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = layer.multihead_attn.in_proj_bias.chunk(3)

        def split(t):
            return t.view(bsz, t.shape[1], heads, head_dim).transpose(1, 2)

        q = split(F.linear(tgt + query_pos, w_q, b_q))
        k = split(F.linear(memory + pos, w_k, b_k))
        v = split(F.linear(memory, w_v, b_v))
        attend = mask | ~mask.any(dim=-1, keepdim=True)  # Mask2Former's empty-row rule
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None], scale=1.0 / math.sqrt(head_dim))
        out = layer.multihead_attn.out_proj(out.transpose(1, 2).reshape(bsz, num_q, dim))
        return layer.norm(tgt + out)


def _case(device: torch.device, smoke: bool, side: int, mode: str, dtype: torch.dtype) -> KernelCase:
    bsz, num_q, dim, heads, ffn, n = 2, 100, 256, 8, 2048, side * side
    shape_id = f"B{bsz}-Q{num_q}-C{dim}-h{heads}-N{n}-{str(dtype).replace('torch.', '')}"
    if smoke:
        bsz, num_q, dim, heads, ffn, n = 1, 7, 32, 2, 64, side // 4 + 4

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        layer = _DecoderLayer(dim, heads, ffn).to(dev, dt)
        grad = mode != "fwd"
        tgt = torch.randn(bsz, num_q, dim, device=dev, dtype=dt, requires_grad=grad)
        memory = torch.randn(bsz, n, dim, device=dev, dtype=dt, requires_grad=grad)
        mask = torch.rand(bsz, num_q, n, device=dev) < 0.5
        mask[:, ::10] = False
        return {
            "layer": layer,
            "tgt": tgt,
            "memory": memory,
            "mask": mask,
            "pos": torch.randn(bsz, n, dim, device=dev, dtype=dt),
            "query_pos": torch.randn(bsz, num_q, dim, device=dev, dtype=dt),
            "cotangent": torch.randn(bsz, num_q, dim, device=dev, dtype=dt),
        }

    def provider(attention: str) -> Callable[[dict], Callable[[], Any]]:
        def factory(x: dict) -> Callable[[], Any]:
            if attention == "triton":
                require_triton(device, smoke)

            def forward():
                return x["layer"](x["tgt"], x["memory"], x["mask"], x["pos"], x["query_pos"], attention)

            if mode == "fwd":

                def run():
                    with torch.no_grad():
                        return forward()

                return run

            def run_bwd():
                return torch.autograd.grad(forward(), (x["tgt"], x["memory"]), x["cotangent"])

            return run_bwd

        return factory

    elem = torch.empty((), dtype=dtype).element_size()
    weights = 4 * dim * dim + 4 * dim * dim + 2 * dim * ffn  # cross (q, k, v, out) + self + FFN
    acts = 2 * bsz * n * dim + 4 * bsz * num_q * dim + bsz * num_q * n  # memory, pos, tgt/pos/out, bool mask
    macs = bsz * (
        2 * n * dim * dim
        + 2 * num_q * dim * dim
        + 2 * num_q * n * dim  # cross: k, v proj; q, out; attn
        + 4 * num_q * dim * dim
        + 2 * num_q * num_q * dim
        + 2 * num_q * dim * ffn
    )  # self + FFN
    fwd_bytes = elem * (weights + acts)
    return KernelCase(
        family=FAMILY,
        op="mask2former_decoder_layer",
        shape_id=shape_id,
        make_inputs=make_inputs,
        providers={"triton": provider("triton"), "torch": provider("torch"), "sdpa": provider("sdpa")},
        flops=2.0 * macs if mode == "fwd" else 6.0 * macs,
        min_bytes=float(fwd_bytes if mode == "fwd" else 2 * fwd_bytes),
        mode=mode,
        dtype=dtype,
        reference="sdpa",
        quick=side == 32,
    )


@register_kernel_cases(FAMILY)
def mask2former_layer_cases(device: torch.device, smoke: bool) -> list[KernelCase]:
    """One decoder layer at 1/32, 1/16, 1/8 of 512x512, fwd and fwd_bwd; fp16 on a GPU, fp32 on the CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return [_case(device, smoke, side, mode, dtype) for side in SIDES for mode in ("fwd", "fwd_bwd")]
