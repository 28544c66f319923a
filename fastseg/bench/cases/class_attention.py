"""Benchmark cases of the `class_attention` kernel family (issue 5).

* ``pixel_class_attention`` at ECENet's 512x512 stages: B = 8, h = 4, d = 64, K = 150, N in {32², 64², 128²}, negated
  softmax plus the head-mean logits (both outputs, as ECENet uses them).
* ``masked_class_attention`` at Mask2Former's decoder: B = 8, h = 8, d = 32, Q = 100, N in {32², 64², 128²}, a random
  boolean mask with some empty rows (the kernel never skips masked blocks, so the density does not change its cost).

Providers: ``triton`` (fastseg), ``torch`` (the reference), ``sdpa`` (``F.scaled_dot_product_attention``; for ECENet
with negated q plus one separate matmul over the concatenated heads for the logits mean; for Mask2Former with the
empty-row fix-up applied and the mask as ``attn_mask``), ``torch_compile`` (the reference under ``torch.compile``).
Modes ``fwd`` and ``fwd_bwd`` (gradients of q, k, v; through both outputs for ECENet).

These ops are memory-bound (performance_anchors.md 3.3): ``min_bytes`` counts every input read once and every output
written once (for ``fwd_bwd`` the forward's plus the backward's), so GB/s over the HBM peak is the figure of merit.
``flops`` counts the matmuls once (4 * rows * cols * d * heads forward, twice that backward, recomputation excluded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastseg.bench.core import KernelCase, register_kernel_cases, require_compile, require_triton
from fastseg.kernels import (
    masked_class_attention,
    masked_class_attention_ref,
    pixel_class_attention,
    pixel_class_attention_ref,
)

FAMILY = "class_attention"
SIDES = (32, 64, 128)  # feature-map sides at 512x512 input: strides 16, 8, 4


def _runner(forward: Callable[[], Any], inputs: dict, mode: str) -> Callable[[], Any]:
    """``fwd``: the forward under no_grad; ``fwd_bwd``: forward then gradients of q, k, v."""
    if mode == "fwd":

        def run() -> Any:
            with torch.no_grad():
                return forward()

        return run
    leaves = (inputs["q"], inputs["k"], inputs["v"])

    def run_bwd() -> Any:
        outs = forward()
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, leaves, inputs["cotangents"][: len(outs)])

    return run_bwd


def _providers(
    device: torch.device, smoke: bool, mode: str, triton_fn: Callable, ref_fn: Callable, sdpa_fn: Callable
) -> dict[str, Callable[[dict], Callable[[], Any]]]:
    def triton_provider(inputs: dict) -> Callable[[], Any]:
        require_triton(device, smoke)
        return _runner(lambda: triton_fn(inputs), inputs, mode)

    def compile_provider(inputs: dict) -> Callable[[], Any]:
        require_compile(device, smoke)
        compiled = torch.compile(ref_fn, dynamic=False)
        return _runner(lambda: compiled(inputs), inputs, mode)

    return {
        "triton": triton_provider,
        "torch": lambda inputs: _runner(lambda: ref_fn(inputs), inputs, mode),
        "sdpa": lambda inputs: _runner(lambda: sdpa_fn(inputs), inputs, mode),
        "torch_compile": compile_provider,
    }


# ------------------------------------------------------------------------------------------------ pixel -> class
def _pixel_case(device: torch.device, smoke: bool, side: int, mode: str, dtype: torch.dtype) -> KernelCase:
    bsz, heads, dim, num_k, n = 8, 4, 64, 150, side * side
    shape_id = f"ecenet-B{bsz}-h{heads}-K{num_k}-N{n}-d{dim}-{str(dtype).replace('torch.', '')}"
    if smoke:
        bsz, heads, dim, num_k, n = 1, 2, 16, 19, side + 8
    scale = dim**-0.5

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        grad = mode != "fwd"
        q = torch.randn(bsz, heads, n, dim, device=dev, dtype=dt, requires_grad=grad)
        k = torch.randn(bsz, heads, num_k, dim, device=dev, dtype=dt, requires_grad=grad)
        v = torch.randn(bsz, heads, num_k, dim, device=dev, dtype=dt, requires_grad=grad)
        cot = (torch.randn(bsz, heads, n, dim, device=dev, dtype=dt), torch.randn(bsz, num_k, n, device=dev, dtype=dt))
        return {"q": q, "k": k, "v": v, "cotangents": cot}

    def triton_fn(x: dict):
        return pixel_class_attention(x["q"], x["k"], x["v"], scale, negate=True, return_logits_mean=True, impl="triton")

    def ref_fn(x: dict):
        return pixel_class_attention_ref(x["q"], x["k"], x["v"], scale, negate=True, return_logits_mean=True)

    def sdpa_fn(x: dict):
        q, k, v = x["q"], x["k"], x["v"]
        out = F.scaled_dot_product_attention(-q, k, v, scale=scale)  # softmax(-S) @ v
        # Head-mean logits as one matmul over the concatenated heads: (B, N, h*d) @ (B, h*d, K).
        q_cat = q.transpose(1, 2).reshape(bsz, n, heads * dim)
        k_cat = k.transpose(1, 2).reshape(bsz, num_k, heads * dim)
        mean = torch.matmul(k_cat, q_cat.transpose(1, 2)) * (scale / heads)  # (B, K, N)
        return out, mean

    elem = torch.empty((), dtype=dtype).element_size()
    qo, kv, mean = bsz * heads * n * dim, bsz * heads * num_k * dim, bsz * num_k * n
    fwd_bytes = elem * (2 * qo + 2 * kv + mean)  # q, k, v in; out, logits_mean out
    bwd_bytes = elem * (3 * qo + 4 * kv + mean)  # q, k, v, dout, dmean in; dq, dk, dv out
    mac = bsz * heads * n * num_k * dim
    return KernelCase(
        family=FAMILY,
        op="pixel_class_attention",
        shape_id=shape_id,
        make_inputs=make_inputs,
        providers=_providers(device, smoke, mode, triton_fn, ref_fn, sdpa_fn),
        flops=4.0 * mac if mode == "fwd" else 12.0 * mac,
        min_bytes=float(fwd_bytes if mode == "fwd" else fwd_bytes + bwd_bytes),
        mode=mode,
        dtype=dtype,
        reference="torch",
        quick=side == (64 if device.type == "cuda" else 32),
    )


# ------------------------------------------------------------------------------------------- class -> pixel (mask)
def _masked_case(device: torch.device, smoke: bool, side: int, mode: str, dtype: torch.dtype) -> KernelCase:
    bsz, heads, dim, num_q, n = 8, 8, 32, 100, side * side
    shape_id = f"mask2former-B{bsz}-h{heads}-Q{num_q}-N{n}-d{dim}-{str(dtype).replace('torch.', '')}"
    if smoke:
        bsz, heads, dim, num_q, n = 1, 2, 16, 7, side + 8
    scale = dim**-0.5

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        grad = mode != "fwd"
        q = torch.randn(bsz, heads, num_q, dim, device=dev, dtype=dt, requires_grad=grad)
        k = torch.randn(bsz, heads, n, dim, device=dev, dtype=dt, requires_grad=grad)
        v = torch.randn(bsz, heads, n, dim, device=dev, dtype=dt, requires_grad=grad)
        mask = torch.rand(bsz, num_q, n, device=dev) < 0.5
        mask[:, ::10] = False  # some queries with an empty predicted mask
        return {"q": q, "k": k, "v": v, "mask": mask, "cotangents": (torch.randn_like(q.detach()),)}

    def triton_fn(x: dict):
        return masked_class_attention(x["q"], x["k"], x["v"], x["mask"], scale, impl="triton")

    def ref_fn(x: dict):
        return masked_class_attention_ref(x["q"], x["k"], x["v"], x["mask"], scale)

    def sdpa_fn(x: dict):
        mask = x["mask"]
        attend = mask | ~mask.any(dim=-1, keepdim=True)  # Mask2Former's empty-row rule, part of the op's cost
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=attend[:, None], scale=scale)

    elem = torch.empty((), dtype=dtype).element_size()
    qo, kv, mask_bytes = bsz * heads * num_q * dim, bsz * heads * n * dim, bsz * num_q * n  # bool mask: 1 byte
    fwd_bytes = elem * (2 * qo + 2 * kv) + mask_bytes  # q, k, v, mask in; out out
    bwd_bytes = elem * (4 * qo + 4 * kv) + mask_bytes + 4 * bsz * heads * num_q  # q, k, v, out, dout, mask, lse; grads
    mac = bsz * heads * num_q * n * dim
    return KernelCase(
        family=FAMILY,
        op="masked_class_attention",
        shape_id=shape_id,
        make_inputs=make_inputs,
        providers=_providers(device, smoke, mode, triton_fn, ref_fn, sdpa_fn),
        flops=4.0 * mac if mode == "fwd" else 12.0 * mac,
        min_bytes=float(fwd_bytes if mode == "fwd" else fwd_bytes + bwd_bytes),
        mode=mode,
        dtype=dtype,
        reference="torch",
        quick=side == (64 if device.type == "cuda" else 32),
    )


@register_kernel_cases(FAMILY)
def class_attention_cases(device: torch.device, smoke: bool) -> list[KernelCase]:
    """ECENet and Mask2Former shapes at 512x512, fwd and fwd_bwd; fp16 on a GPU, fp32 on the CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cases = []
    for side in SIDES:
        for mode in ("fwd", "fwd_bwd"):
            cases.append(_pixel_case(device, smoke, side, mode, dtype))
            cases.append(_masked_case(device, smoke, side, mode, dtype))
    return cases
