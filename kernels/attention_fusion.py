"""Adaptive Attention Fusion (WeakTr / SemPLeS): weighted mean of every layer's and head's attention map, split into
the class->patch and patch->patch maps, in one read of the stacked maps.

Inputs. ``attn (B, M, N, N)``: the M = L x H attention maps (softmax rows) of a ViT with ``K`` class tokens first
and ``P = N - K`` patch tokens after them; ``weights (B, M)``: the per-image AAF weight of each map (sigmoid outputs
in WeakTr, but any real values work). Forward::

    F[b, i, j]  = (1 / M) * sum_m weights[b, m] * attn[b, m, i, K + j]        i in [0, N), j in [0, P)
    cross[b]    = F[b, :K, :]      (B, K, P)   class -> patch attention, the CAM re-weighting map
    patch[b]    = F[b, K:, :]      (B, P, P)   patch -> patch affinity, the fine-CAM propagation matrix

The columns of the class tokens (``j < K``) are never read. Backward, with ``G = concat(grad_cross, grad_patch)``
along the rows (B, N, P)::

    d weights[b, m]          = (1 / M) * sum_{i, j} attn[b, m, i, K + j] * G[b, i, j]
    d attn[b, m, i, K + j]   = weights[b, m] / M * G[b, i, j]        and 0 for the class-token columns

In WeakTr and SemPLeS the maps reach AAF detached, so only ``weights`` trains (``d attn`` is computed only when
``attn`` requires a gradient).

Kernels. ``_attention_fusion_fwd_kernel``: one program per (BLOCK_I rows, BLOCK_J patch columns, image) walks the
M maps, accumulating ``w * tile`` in fp32 registers, and stores each row to ``cross`` or ``patch``: every needed
element of ``attn`` is read exactly once. ``_attention_fusion_bwd_kernel``: the same tiling; the program loads its
tile of G once, then for each map reads the attn tile once, writes one partial sum of ``attn * G`` per (map, tile)
to a workspace that PyTorch sums in a fixed order (deterministic, no atomics), and writes ``d attn`` when asked.

Limits: attn fp32 / fp16 / bf16 / fp64 (fp64 and, under the interpreter, bf16 run in fp32); weights of any float
dtype (used in fp32); any strides; M and N up to 2**31 each; offsets are int64. Outputs take attn's dtype
(fp32 accumulation). The ONNX translation is the reference (``DECOMPOSITIONS``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._utils import (
    FLOAT_DTYPES,
    acc_dtype,
    check_same_device,
    check_tensor,
    kernel_dtype,
    resolve_impl,
    run_triton_on_cpu,
    tl,
    triton,
    use_triton,
)

__all__ = ["DECOMPOSITIONS", "attention_fusion", "attention_fusion_ref"]

_FLOAT_DTYPES = (*FLOAT_DTYPES, torch.float64)  # fp64 runs the Triton path in fp32
_BLOCK_I = 32
_BLOCK_J = 64


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------
def attention_fusion_ref(
    attn: torch.Tensor, weights: torch.Tensor, num_class_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ``mean_m(weights[:, m] * attn[:, m])`` split into (class -> patch, patch -> patch)."""
    k = num_class_tokens
    acc = acc_dtype(attn.dtype)  # fp32 accumulation, fp64 stays fp64
    w = weights.to(acc)[:, :, None, None]
    cross = (attn[:, :, :k, k:].to(acc) * w).mean(1)  # (B, K, P)
    patch = (attn[:, :, k:, k:].to(acc) * w).mean(1)  # (B, P, P)
    return cross.to(attn.dtype), patch.to(attn.dtype)


# Triton kernels and launchers keep their long argument lists compact.
# fmt: off
# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _attention_fusion_fwd_kernel(
    attn_ptr, w_ptr, cross_ptr, patch_ptr,
    M, N, K, P, inv_m,
    s_ab, s_am, s_ai, s_aj, s_wb, s_wm,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < N
    col_ok = cols < P
    tile_ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * s_ai + (cols + K).to(tl.int64)[None, :] * s_aj
    a_ptrs = attn_ptr + b * s_ab + offs  # advanced by one map per step: 64-bit pointer arithmetic
    w_ptrs = w_ptr + b * s_wb
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for _m in range(0, M):
        w = tl.load(w_ptrs).to(tl.float32)
        tile = tl.load(a_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        acc += w * tile
        a_ptrs += s_am
        w_ptrs += s_wm
    acc = acc * inv_m
    out_cols = cols.to(tl.int64)[None, :]
    # rows < K belong to the class -> patch map, rows >= K to the patch -> patch map (both contiguous)
    cross_off = b * K * P + rows.to(tl.int64)[:, None] * P + out_cols
    tl.store(cross_ptr + cross_off, acc.to(cross_ptr.dtype.element_ty), mask=tile_ok & (rows < K)[:, None])
    patch_off = b * P * P + (rows - K).to(tl.int64)[:, None] * P + out_cols
    tl.store(patch_ptr + patch_off, acc.to(patch_ptr.dtype.element_ty), mask=tile_ok & (rows >= K)[:, None])


@triton.jit
def _attention_fusion_bwd_kernel(
    attn_ptr, w_ptr, gcross_ptr, gpatch_ptr, part_ptr, gattn_ptr,
    M, N, K, P, inv_m, num_tiles,
    s_ab, s_am, s_ai, s_aj, s_wb, s_wm,
    s_gb, s_gm, s_gi, s_gj,
    NEED_GRAD_ATTN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    tile_id = pid_i * tl.num_programs(1) + pid_j
    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < N
    col_ok = cols < P
    tile_ok = row_ok[:, None] & col_ok[None, :]
    out_cols = cols.to(tl.int64)[None, :]
    # the upstream gradient tile, read once: rows < K from grad_cross, rows >= K from grad_patch (both contiguous)
    g_cross = tl.load(gcross_ptr + b * K * P + rows.to(tl.int64)[:, None] * P + out_cols,
                      mask=tile_ok & (rows < K)[:, None], other=0.0).to(tl.float32)
    g_patch = tl.load(gpatch_ptr + b * P * P + (rows - K).to(tl.int64)[:, None] * P + out_cols,
                      mask=tile_ok & (rows >= K)[:, None], other=0.0).to(tl.float32)
    g = g_cross + g_patch
    offs = rows.to(tl.int64)[:, None] * s_ai + (cols + K).to(tl.int64)[None, :] * s_aj
    goffs = rows.to(tl.int64)[:, None] * s_gi + (cols + K).to(tl.int64)[None, :] * s_gj
    a_ptrs = attn_ptr + b * s_ab + offs
    w_ptrs = w_ptr + b * s_wb
    g_ptrs = gattn_ptr + b * s_gb + goffs
    p_ptr = part_ptr + b * M * num_tiles + tile_id
    for _m in range(0, M):
        tile = tl.load(a_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        partial = tl.sum(tl.sum(tile * g, axis=1), axis=0) * inv_m
        tl.store(p_ptr, partial)
        if NEED_GRAD_ATTN:
            w = tl.load(w_ptrs).to(tl.float32)
            tl.store(g_ptrs, (w * inv_m * g).to(gattn_ptr.dtype.element_ty), mask=tile_ok)
        a_ptrs += s_am
        w_ptrs += s_wm
        g_ptrs += s_gm
        p_ptr += num_tiles


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def _attention_fusion_triton(attn: torch.Tensor, weights: torch.Tensor,
                             num_class_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, maps, tokens, _ = attn.shape
    k, p = num_class_tokens, tokens - num_class_tokens
    cross = attn.new_empty((batch, k, p))
    patch = attn.new_empty((batch, p, p))
    if batch * maps * p == 0 or tokens == 0:
        cross.zero_(), patch.zero_()
        return cross, patch
    src = kernel_dtype(attn)
    out_dtype = src.dtype
    cross_k, patch_k = (cross, patch) if out_dtype == attn.dtype else (cross.to(out_dtype), patch.to(out_dtype))
    grid = (triton.cdiv(tokens, _BLOCK_I), triton.cdiv(p, _BLOCK_J), batch)
    _attention_fusion_fwd_kernel[grid](
        src, weights, cross_k, patch_k, maps, tokens, k, p, 1.0 / maps,
        *src.stride(), weights.stride(0), weights.stride(1),
        BLOCK_I=_BLOCK_I, BLOCK_J=_BLOCK_J, num_warps=4,
    )
    if cross_k is not cross:
        cross.copy_(cross_k), patch.copy_(patch_k)
    return cross, patch


def _attention_fusion_backward_ref(grad_cross, grad_patch, attn, weights, num_class_tokens, need_grad_attn):
    k = num_class_tokens
    maps = attn.shape[1]
    acc = acc_dtype(attn.dtype)
    g = torch.cat([grad_cross, grad_patch], dim=1).to(acc)  # (B, N, P)
    grad_w = torch.einsum("bmij,bij->bm", attn[:, :, :, k:].to(acc), g) / maps
    if not need_grad_attn:
        return grad_w.to(weights.dtype), attn.new_empty((0,))
    grad_attn = attn.new_zeros(attn.shape)
    grad_attn[:, :, :, k:] = (weights.to(acc)[:, :, None, None] * g[:, None] / maps).to(attn.dtype)
    return grad_w.to(weights.dtype), grad_attn


def _attention_fusion_backward_triton(grad_cross, grad_patch, attn, weights, num_class_tokens, need_grad_attn):
    batch, maps, tokens, _ = attn.shape
    k, p = num_class_tokens, tokens - num_class_tokens
    if batch * maps * p == 0 or tokens == 0:
        return _attention_fusion_backward_ref(grad_cross, grad_patch, attn, weights, k, need_grad_attn)
    src = kernel_dtype(attn)
    gc, gp = grad_cross.contiguous(), grad_patch.contiguous()
    if gc.dtype != src.dtype:
        gc, gp = gc.to(src.dtype), gp.to(src.dtype)
    grid = (triton.cdiv(tokens, _BLOCK_I), triton.cdiv(p, _BLOCK_J), batch)
    num_tiles = grid[0] * grid[1]
    part = torch.empty((batch, maps, num_tiles), dtype=torch.float32, device=attn.device)
    grad_attn = torch.zeros(attn.shape, dtype=src.dtype, device=attn.device) if need_grad_attn else part
    _attention_fusion_bwd_kernel[grid](
        src, weights, gc, gp, part, grad_attn, maps, tokens, k, p, 1.0 / maps, num_tiles,
        *src.stride(), weights.stride(0), weights.stride(1),
        *(grad_attn.stride() if need_grad_attn else (0, 0, 0, 0)),
        NEED_GRAD_ATTN=need_grad_attn, BLOCK_I=_BLOCK_I, BLOCK_J=_BLOCK_J, num_warps=4,
    )
    grad_w = part.sum(-1).to(weights.dtype)
    if not need_grad_attn:
        return grad_w, attn.new_empty((0,))
    return grad_w, grad_attn.to(attn.dtype)


# fmt: on
# ----------------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastseg::attention_fusion", mutates_args=())
def _attention_fusion_op(
    attn: torch.Tensor, weights: torch.Tensor, num_class_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(attn):
        return _attention_fusion_triton(attn, weights, num_class_tokens)
    return attention_fusion_ref(attn, weights, num_class_tokens)


@_attention_fusion_op.register_fake
def _(attn, weights, num_class_tokens):
    batch, _, tokens, _ = attn.shape
    p = tokens - num_class_tokens
    return attn.new_empty((batch, num_class_tokens, p)), attn.new_empty((batch, p, p))


@torch.library.custom_op("fastseg::attention_fusion_backward", mutates_args=())
def _attention_fusion_backward_op(
    grad_cross: torch.Tensor,
    grad_patch: torch.Tensor,
    attn: torch.Tensor,
    weights: torch.Tensor,
    num_class_tokens: int,
    need_grad_attn: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(attn):
        return _attention_fusion_backward_triton(
            grad_cross, grad_patch, attn, weights, num_class_tokens, need_grad_attn
        )
    return _attention_fusion_backward_ref(grad_cross, grad_patch, attn, weights, num_class_tokens, need_grad_attn)


@_attention_fusion_backward_op.register_fake
def _(grad_cross, grad_patch, attn, weights, num_class_tokens, need_grad_attn):
    return weights.new_empty(weights.shape), attn.new_empty(attn.shape if need_grad_attn else (0,))


def _setup_context(ctx, inputs, output):
    attn, weights, num_class_tokens = inputs
    ctx.save_for_backward(attn, weights)
    ctx.num_class_tokens = num_class_tokens


def _backward(ctx, grad_cross, grad_patch):
    attn, weights = ctx.saved_tensors
    need_attn = ctx.needs_input_grad[0]
    grad_w, grad_attn = torch.ops.fastseg.attention_fusion_backward(
        grad_cross, grad_patch, attn, weights, ctx.num_class_tokens, need_attn
    )
    return (grad_attn if need_attn else None), grad_w, None


_attention_fusion_op.register_autograd(_backward, setup_context=_setup_context)


def _attention_fusion_decomposition(
    attn: torch.Tensor, weights: torch.Tensor, num_class_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fusion_ref(attn, weights, num_class_tokens)


DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {
    torch.ops.fastseg.attention_fusion.default: _attention_fusion_decomposition,
}


# ----------------------------------------------------------------------------------------------------------------
# Functional entry
# ----------------------------------------------------------------------------------------------------------------
def attention_fusion(
    attn: torch.Tensor, weights: torch.Tensor, num_class_tokens: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """AAF-weighted mean of the stacked attention maps, as (class -> patch, patch -> patch) maps.

    Args:
        attn: ``(B, M, N, N)`` attention maps (M = layers x heads), class tokens first; any strides.
        weights: ``(B, M)`` per-image weight of each map (AAF output).
        num_class_tokens: K, the number of class tokens at the start of the token axis (``0 <= K <= N``).
        impl: ``"auto" | "triton" | "torch"`` (see ``fastseg.kernels._utils``).

    Returns:
        ``cross (B, K, P)`` and ``patch (B, P, P)`` with ``P = N - K``, in attn's dtype. Gradients flow to both
        ``weights`` and ``attn``.

    Raises:
        ValueError: wrong ranks / shapes / dtypes / devices, or K outside ``[0, N]``.
    """
    op = "attention_fusion"
    check_tensor("attn", attn, ndim=4, dtypes=_FLOAT_DTYPES, op=op)
    check_tensor("weights", weights, ndim=2, dtypes=_FLOAT_DTYPES, op=op)
    batch, maps, tokens, tokens2 = attn.shape
    if tokens != tokens2:
        raise ValueError(f"{op}: attn must hold square (N, N) maps, got shape {tuple(attn.shape)}")
    if tuple(weights.shape) != (batch, maps):
        raise ValueError(
            f"{op}: weights must have shape (B, M) = {(batch, maps)} to match attn "
            f"{tuple(attn.shape)}, got {tuple(weights.shape)}"
        )
    if (
        isinstance(num_class_tokens, bool)
        or not isinstance(num_class_tokens, int)
        or not 0 <= num_class_tokens <= tokens
    ):
        raise ValueError(f"{op}: num_class_tokens must be an int in [0, N={tokens}], got {num_class_tokens!r}")
    if maps == 0:
        raise ValueError(f"{op}: attn holds no maps (M = 0); the mean over maps is undefined")
    check_same_device(op, attn=attn, weights=weights)
    mode = resolve_impl(impl, attn)
    if mode == "torch":
        return attention_fusion_ref(attn, weights, num_class_tokens)
    with run_triton_on_cpu(mode == "interpret"):
        return torch.ops.fastseg.attention_fusion(attn, weights, num_class_tokens)
