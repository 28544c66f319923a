"""Pixel -> class attention, forward and backward in Triton: ECENet's semantics attention.

Pixels are the queries; K class embeddings are the keys and values. Per batch ``b`` and head ``h``, with
``S = scale * q @ k^T`` (N x K) and ``sign = -1`` when ``negate`` else ``+1``::

    P   = softmax(sign * S, over the K classes)          out = P @ v                   (B, h, N, d)
    M   = mean over heads of S  (scaled, NOT negated)   logits_mean[b, k, n] = M[n, k]  (B, K, N)

ECENet computes ``softmax(rowmax(A) - A)`` with ``A = q k^T * scale`` (= softmax(-A)) and uses the head-mean of the
*positive-sense, scaled* logits ``A`` as the stage mask; ``logits_mean`` is exactly that. Backward (recomputing ``P``
from q and k, class tile by class tile)::

    dP = dout @ v^T     dA = P * (dP - rowsum(P * dP))     dS = sign * dA + dM^T / h
    dq = scale * dS @ k      dk = scale * dS^T @ q       dv = P^T @ dout

Kernels. One forward program owns a tile of pixels and streams the classes in tiles with an online softmax (shared
memory holds a few k / v tiles, not all K classes); when the mean is requested the program also loops over the heads,
which keeps the head-mean free of atomics (a second pass over class tiles sums ``q_h k_h^T`` over heads).
The backward is two kernels: dq per pixel tile, two passes over class tiles (it also writes the per-pixel base-2
log-sum-exp and ``rowsum(P * dP)``), and dk / dv per class block with the pixels split into chunks whose fp32
partial sums are added afterwards (deterministic, no atomics).

NaN / inf policy: none is imposed; non-finite values propagate as in the reference, and the Triton kernel and the
reference agree on them (tests/kernels/test_pixel_class_attention.py checks it). A pixel whose softmax input
``sign * S`` holds a NaN or a +inf gets a NaN ``out`` (a NaN in its q row or in any class's k row does that; an
infinity does it where the sign makes the logit +inf, while a -inf logit only gets weight 0). A NaN in one class's v
row reaches ``out`` of every pixel (P > 0 everywhere). ``logits_mean`` follows IEEE arithmetic (NaN / +-inf where
the logits are). Unaffected pixels stay finite and equal to the reference.

Limits: q, k, v of one dtype in {float32, float16, bfloat16}; head dim d <= 128 (any d; the block is padded to a
power of two >= 16); K <= 256. fp32 inputs follow the one dot-precision policy (`_utils.dot_precision`: IEEE, no
TF32) so fp32 results match the reference; fp16 / bf16 accumulate in fp32. Triton's interpreter cannot do bf16
arithmetic (CPU tests use fp32 / fp16). Where a limit is exceeded, ``impl="auto"`` runs the reference and
``impl="triton"`` raises ``ValueError``. The op is exported through its reference (``DECOMPOSITIONS``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._utils import (
    LOG2E,
    MAX_HEAD_DIM,
    check_qkv,
    dot_precision,
    gpu_target,
    kernel_fits,
    num_splits,
    pow2,
    resolve_impl,
    run_triton_on_cpu,
    strides,
    target_programs,
    tl,
    triton,
    use_triton,
)

__all__ = ["pixel_class_attention", "pixel_class_attention_ref", "DECOMPOSITIONS", "MAX_CLASSES"]

MAX_CLASSES = 256  # every class stays on chip


# ----------------------------------------------------------------------------------------------------------------
# Reference (the oracle, the CPU path and the export graph)
# ----------------------------------------------------------------------------------------------------------------
def pixel_class_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, negate: bool = False, return_logits_mean: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain PyTorch pixel->class attention; see `pixel_class_attention` for the maths and shapes."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, h, N, K)
    weights = torch.softmax(-logits if negate else logits, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(weights, v)
    if not return_logits_mean:
        return out
    return out, logits.mean(dim=1).transpose(1, 2)  # head-mean of the scaled, un-negated logits: (B, K, N)


def _pixel_class_attention_decomposition(
    q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool, return_logits_mean: bool
) -> tuple[Tensor, Tensor]:
    out, mean = pixel_class_attention_ref(q, k, v, scale, negate, return_logits_mean=True)
    if not return_logits_mean:
        return out.contiguous(), q.new_empty((0,))
    return out.contiguous(), mean.contiguous()


def _pixel_class_attention_bwd_ref(
    grad_out: Tensor, grad_mean: Tensor | None, q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The analytic backward of the module docstring, fp32 inside (the CPU kernel of the backward op)."""
    qf, kf, vf, go = q.float(), k.float(), v.float(), grad_out.float()
    sign = -1.0 if negate else 1.0
    p = torch.softmax(sign * scale * (qf @ kf.transpose(-1, -2)), dim=-1)
    dv = p.transpose(-1, -2) @ go
    dp = go @ vf.transpose(-1, -2)
    ds = sign * p * (dp - (p * dp).sum(-1, keepdim=True))
    if grad_mean is not None and grad_mean.numel() > 0:
        ds = ds + grad_mean.float().transpose(1, 2)[:, None] / q.shape[1]
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
# The kernels and launchers keep their hand layout (one line per group of arguments): no formatter.
# fmt: off
@triton.jit
def _class_tile(q, k_head, v_head, k0, NUM_K, offs_d, d_ok, stride_kk, stride_kd, stride_vk, stride_vd, scale,
                NEGATE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """One class tile: its offsets and mask, its k and v rows, and the base-2 logits ``sign * scale * q k^T * log2(e)``
    of the pixel tile ``q`` against it (``-inf`` for padded classes: they get no weight)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < NUM_K
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_head + offs_k[:, None] * stride_kk + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_head + offs_k[:, None] * stride_vk + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (BLOCK_N, BLOCK_K), fp32
    if NEGATE:
        a = -s * LOG2E
    else:
        a = s * LOG2E
    return offs_k, k_ok, k, v, tl.where(k_ok[None, :], a, float("-inf"))


@triton.jit
def _pixel_class_attention_fwd_kernel(
    q_ptr,  # (B, H, N, D) any strides
    k_ptr,  # (B, H, NUM_K, D) any strides
    v_ptr,  # (B, H, NUM_K, D) any strides
    out_ptr,  # (B, H, N, D) contiguous
    mean_ptr,  # (B, NUM_K, N) contiguous (written when WRITE_MEAN)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    H, N, NUM_K, D, HEADS_PER_PROGRAM, scale, inv_heads,
    NEGATE: tl.constexpr, WRITE_MEAN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, KV_STAGES: tl.constexpr,
):
    # Classes are streamed in BLOCK_K tiles with an online softmax, so shared memory holds KV_STAGES k / v tiles
    # (not every class of every head): bf16 d=64 fits an L4's 99 KB and d=128 fits everywhere.
    pid_n = tl.program_id(0)
    groups = H // HEADS_PER_PROGRAM
    b = (tl.program_id(1) // groups).to(tl.int64)
    h0 = (tl.program_id(1) % groups) * HEADS_PER_PROGRAM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = offs_n < N, offs_d < D
    nd_mask = n_ok[:, None] & d_ok[None, :]
    q_rows = q_ptr + b * stride_qb + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd
    for i in tl.range(0, HEADS_PER_PROGRAM, num_stages=1):
        h = (h0 + i).to(tl.int64)
        q = tl.load(q_rows + h * stride_qh, mask=nd_mask, other=0.0)
        k_head = k_ptr + b * stride_kb + h * stride_kh
        v_head = v_ptr + b * stride_vb + h * stride_vh
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for k0 in tl.range(0, NUM_K, BLOCK_K, num_stages=KV_STAGES):
            offs_k, k_ok, k, v, a = _class_tile(q, k_head, v_head, k0, NUM_K, offs_d, d_ok, stride_kk, stride_kd,
                                             stride_vk, stride_vd, scale, NEGATE, DOT_PRECISION, BLOCK_K)
            m_new = tl.maximum(m, tl.max(a, axis=1))
            # A row whose logits so far are all -inf keeps m = -inf: shift by 0 so that exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(a - m_safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m = m_new
        o_ptrs = out_ptr + ((b * H + h) * N + offs_n[:, None]) * D + offs_d[None, :]  # out is contiguous
        tl.store(o_ptrs, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=nd_mask)
    if WRITE_MEAN:
        # Head-mean of the logits per class tile: sum_h q_h k_h^T is one reduction over (head, d); the q tiles are
        # re-read from L1 / L2 per class tile (K / BLOCK_K times), which costs no HBM traffic.
        for k0 in range(0, NUM_K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < NUM_K
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k_rows = k_ptr + b * stride_kb + offs_k[:, None] * stride_kk + offs_d[None, :] * stride_kd
            mean_acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for i in tl.range(0, HEADS_PER_PROGRAM, num_stages=KV_STAGES):
                h = (h0 + i).to(tl.int64)
                q = tl.load(q_rows + h * stride_qh, mask=nd_mask, other=0.0)
                k = tl.load(k_rows + h * stride_kh, mask=kv_mask, other=0.0)
                mean_acc = tl.dot(q, tl.trans(k), mean_acc, input_precision=DOT_PRECISION)
            m_ptrs = mean_ptr + (b * NUM_K + offs_k[None, :]) * N + offs_n[:, None]  # mean is contiguous (B, K, N)
            tl.store(m_ptrs, (mean_acc * (scale * inv_heads)).to(mean_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _pixel_class_attention_bwd_dq_kernel(
    q_ptr,  # (B, H, N, D) any strides
    k_ptr,  # (B, H, NUM_K, D) any strides
    v_ptr,  # (B, H, NUM_K, D) any strides
    dout_ptr,  # (B, H, N, D) contiguous
    dmean_ptr,  # (B, NUM_K, N) contiguous (read when HAS_DMEAN)
    dq_ptr,  # (B, H, N, D) contiguous out
    lse2_ptr,  # (B, H, N) fp32 out: base-2 log-sum-exp of sign * S
    delta_ptr,  # (B, H, N) fp32 out: rowsum(P * dP)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    H, N, NUM_K, D, scale, inv_heads,
    NEGATE: tl.constexpr, HAS_DMEAN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, KV_STAGES: tl.constexpr,
):
    # Two passes over class tiles (shared memory holds KV_STAGES k / v tiles, registers BLOCK_N x BLOCK_K tiles,
    # whatever K): pass 1 gets the row max m, the sum l and t = sum_k exp(a - m) dP (all rescaled online), so that
    # lse = m + log2(l) and delta = rowsum(P * dP) = t / l; pass 2 forms dS per tile and accumulates dq.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = offs_n < N, offs_d < D
    nd_mask = n_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=nd_mask, other=0.0)
    row = (bh * N + offs_n[:, None]) * D + offs_d[None, :]  # dout and dq are contiguous (B, H, N, D)
    do = tl.load(dout_ptr + row, mask=nd_mask, other=0.0)
    k_head = k_ptr + b * stride_kb + h * stride_kh
    v_head = v_ptr + b * stride_vb + h * stride_vh
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in tl.range(0, NUM_K, BLOCK_K, num_stages=KV_STAGES):
        offs_k, k_ok, k, v, a = _class_tile(q, k_head, v_head, k0, NUM_K, offs_d, d_ok, stride_kk, stride_kd,
                                         stride_vk, stride_vd, scale, NEGATE, DOT_PRECISION, BLOCK_K)
        m_new = tl.maximum(m, tl.max(a, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp2 gives 0, not NaN
        alpha = tl.exp2(m - m_safe)
        e = tl.exp2(a - m_safe[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        l = l * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * dp, axis=1)
        m = m_new
    lse2 = m + tl.log2(l)
    delta = t / l
    dq = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k0 in tl.range(0, NUM_K, BLOCK_K, num_stages=KV_STAGES):
        offs_k, k_ok, k, v, a = _class_tile(q, k_head, v_head, k0, NUM_K, offs_d, d_ok, stride_kk, stride_kd,
                                         stride_vk, stride_vd, scale, NEGATE, DOT_PRECISION, BLOCK_K)
        p = tl.where(k_ok[None, :], tl.exp2(a - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if NEGATE:
            ds = -ds
        if HAS_DMEAN:
            dm = tl.load(dmean_ptr + (b * NUM_K + offs_k[None, :]) * N + offs_n[:, None],
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            ds += dm.to(tl.float32) * inv_heads
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + row, (dq * scale).to(dq_ptr.dtype.element_ty), mask=nd_mask)
    tl.store(lse2_ptr + bh * N + offs_n, lse2, mask=n_ok)  # base-2 log-sum-exp of sign * S
    tl.store(delta_ptr + bh * N + offs_n, delta, mask=n_ok)


@triton.jit
def _pixel_class_attention_bwd_dkdv_kernel(
    q_ptr,  # (B, H, N, D) any strides
    k_ptr,  # (B, H, NUM_K, D) any strides
    v_ptr,  # (B, H, NUM_K, D) any strides
    dout_ptr,  # (B, H, N, D) contiguous
    dmean_ptr,  # (B, NUM_K, N) contiguous (read when HAS_DMEAN)
    lse2_ptr,  # (B, H, N) fp32, from the dq kernel
    delta_ptr,  # (B, H, N) fp32, from the dq kernel
    dk_part_ptr,  # (SPLITS, B, H, NUM_K, D) fp32 contiguous out, summed over SPLITS by the launcher
    dv_part_ptr,  # (SPLITS, B, H, NUM_K, D) fp32 contiguous out
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    B, H, N, NUM_K, D, CHUNK_N, scale, inv_heads,
    NEGATE: tl.constexpr, HAS_DMEAN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b, h = bh // H, bh % H
    offs_k = pid_k * BLOCK_KB + tl.arange(0, BLOCK_KB)
    offs_d = tl.arange(0, BLOCK_D)
    k_ok, d_ok = offs_k < NUM_K, offs_d < D
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_k[:, None] * stride_kk + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_k[:, None] * stride_vk + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_KB, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_KB, BLOCK_D), dtype=tl.float32)
    n_lo = split * CHUNK_N
    n_hi = tl.minimum(n_lo + CHUNK_N, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        nd_mask = n_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=nd_mask, other=0.0)
        do = tl.load(dout_ptr + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=nd_mask, other=0.0)
        lse2 = tl.load(lse2_ptr + bh * N + offs_n, mask=n_ok, other=0.0)
        delta = tl.load(delta_ptr + bh * N + offs_n, mask=n_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (BLOCK_N, BLOCK_KB)
        if NEGATE:
            a = -s * LOG2E
        else:
            a = s * LOG2E
        nk_mask = n_ok[:, None] & k_ok[None, :]
        p = tl.where(nk_mask, tl.exp2(a - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if NEGATE:
            ds = -ds
        if HAS_DMEAN:
            dm = tl.load(dmean_ptr + (b * NUM_K + offs_k[None, :]) * N + offs_n[:, None], mask=nk_mask, other=0.0)
            ds += dm.to(tl.float32) * inv_heads
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    part = ((split * B * H + bh) * NUM_K + offs_k[:, None]) * D + offs_d[None, :]
    tl.store(dk_part_ptr + part, dk * scale, mask=kv_mask)
    tl.store(dv_part_ptr + part, dv, mask=kv_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _tiles(num_k: int, d: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Forward tiles: pixels x class tile, k / v tiles pipelined as deep as the GPU's shared memory allows."""
    block_d = pow2(d)
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units with operands in registers: small tiles, no spills
        block_n, block_k = 32, min(32, pow2(num_k))
    else:
        block_n, block_k = 64, min(64, pow2(num_k))
    size = torch.finfo(dtype).bits // 8
    per_stage = 2 * block_k * block_d * size  # one k and one v tile
    fixed = (block_n * block_d + block_n * block_k) * size  # q and p staged through shared memory for the dots
    budget = gpu_target(device).smem_per_block
    # fp32: 2 stages (3 spilled 4 B on sm_90 with the head-mean pass; static report).
    stages = max(1, min(2 if dtype == torch.float32 else 3, (budget - fixed) // per_stage))
    # fp16 / bf16: 8 warps (4 spilled 16 B on sm_80 with the head-mean pass; static report).
    num_warps = 4 if dtype == torch.float32 else 8
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": block_d, "KV_STAGES": stages, "num_warps": num_warps}


def _pixel_class_attention_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool, return_logits_mean: bool
) -> tuple[Tensor, Tensor]:
    bsz, heads, n, d = q.shape
    num_k = k.shape[2]
    out = q.new_empty(q.shape)
    mean = q.new_empty((bsz, num_k, n)) if return_logits_mean else q.new_empty((0,))
    if out.numel() == 0 and mean.numel() == 0:
        return out, mean
    if num_k == 0:  # softmax over no class: no weight anywhere (the reference gives zeros too)
        return out.zero_(), mean
    cfg = _tiles(num_k, d, q.dtype, q.device)
    heads_per_program = heads if return_logits_mean else 1  # the head-mean needs every head in one program
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), bsz * (heads // heads_per_program))
    _pixel_class_attention_fwd_kernel[grid](
        q, k, v, out, mean, *strides(q), *strides(k), *strides(v),
        heads, n, num_k, d, heads_per_program, float(scale), 1.0 / heads,
        NEGATE=bool(negate), WRITE_MEAN=bool(return_logits_mean), DOT_PRECISION=dot_precision(q.dtype), **cfg,
    )
    return out, mean


def _pixel_class_attention_bwd_triton(
    grad_out: Tensor, grad_mean: Tensor | None, q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool,
    splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, heads, n, d = q.shape
    num_k = k.shape[2]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if n == 0 or num_k == 0 or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out.contiguous()
    has_dmean = grad_mean is not None and grad_mean.numel() > 0
    dmean = grad_mean.contiguous() if has_dmean else grad_out  # dummy pointer when absent
    cfg = _tiles(num_k, d, q.dtype, q.device)  # the forward's tiles (two k / v tiles per stage)
    block_d = cfg["BLOCK_D"]
    lse2 = q.new_empty((bsz, heads, n), dtype=torch.float32)
    delta = torch.empty_like(lse2)
    common = dict(NEGATE=bool(negate), HAS_DMEAN=has_dmean, DOT_PRECISION=dot_precision(q.dtype))
    _pixel_class_attention_bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), bsz * heads)](
        q, k, v, grad_out, dmean, dq, lse2, delta, *strides(q), *strides(k), *strides(v),
        heads, n, num_k, d, float(scale), 1.0 / heads, **cfg, **common,
    )
    # dk / dv: a class block of BLOCK_KB accumulates two (BLOCK_KB, d) fp32 tiles while streaming pixel tiles;
    # fp32 (FMA dots, operands in registers) and d = 128 take half-size tiles, and all need 8 warps, to stay free
    # of spills (4 warps spilled ~0.5 KB in bf16 and ~1 KB in fp32 on sm_80..sm_90; static report).
    small = q.dtype == torch.float32 or block_d > 64
    block_kb = min(32 if small else 64, pow2(num_k))
    k_blocks = triton.cdiv(num_k, block_kb)
    block_n_kv = 32 if small else 64
    n_splits, chunk = num_splits(n, block_n_kv, k_blocks * bsz * heads, target_programs(q.device), splits)
    dk_part = q.new_empty((n_splits, bsz, heads, num_k, d), dtype=torch.float32)
    dv_part = torch.empty_like(dk_part)
    _pixel_class_attention_bwd_dkdv_kernel[(k_blocks, bsz * heads, n_splits)](
        q, k, v, grad_out, dmean, lse2, delta, dk_part, dv_part, *strides(q), *strides(k), *strides(v),
        bsz, heads, n, num_k, d, chunk, float(scale), 1.0 / heads,
        BLOCK_N=block_n_kv, BLOCK_KB=block_kb, BLOCK_D=block_d, num_warps=8, **common,
    )
    dk.copy_(dk_part.sum(0))
    dv.copy_(dv_part.sum(0))
    return dq, dk, dv


# fmt: on
# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (CPU kernel: reference, or Triton under run_triton_on_cpu(); CUDA kernel: Triton)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastseg::pixel_class_attention", mutates_args=())
def _pixel_class_attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool, return_logits_mean: bool
) -> tuple[Tensor, Tensor]:
    if use_triton(q):
        return _pixel_class_attention_fwd_triton(q, k, v, scale, negate, return_logits_mean)
    return _pixel_class_attention_decomposition(q, k, v, scale, negate, return_logits_mean)


@_pixel_class_attention_op.register_fake
def _(q, k, v, scale, negate, return_logits_mean):
    mean_shape = (q.shape[0], k.shape[2], q.shape[2]) if return_logits_mean else (0,)
    return q.new_empty(q.shape), q.new_empty(mean_shape)


@torch.library.custom_op("fastseg::pixel_class_attention_backward", mutates_args=())
def _pixel_class_attention_backward_op(
    grad_out: Tensor, grad_mean: Tensor | None, q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(q):
        return _pixel_class_attention_bwd_triton(grad_out, grad_mean, q, k, v, scale, negate)
    return _pixel_class_attention_bwd_ref(grad_out, grad_mean, q, k, v, scale, negate)


@_pixel_class_attention_backward_op.register_fake
def _(grad_out, grad_mean, q, k, v, scale, negate):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _pixel_class_attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, negate, _ = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale, ctx.negate = scale, negate
    # The backward runs outside the forward's run_triton_on_cpu() context: remember which path the forward took.
    ctx.triton_on_cpu = not q.is_cuda and use_triton(q)


def _pixel_class_attention_backward(ctx, grad_out, grad_mean):
    q, k, v = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    with run_triton_on_cpu(ctx.triton_on_cpu):
        dq, dk, dv = torch.ops.fastseg.pixel_class_attention_backward(
            grad_out, grad_mean, q, k, v, ctx.scale, ctx.negate
        )
    return dq, dk, dv, None, None, None


_pixel_class_attention_op.register_autograd(
    _pixel_class_attention_backward, setup_context=_pixel_class_attention_setup_context
)

# Export: the forward op lowers to its reference (standard MatMul / Softmax / ReduceMean ... in ONNX).
DECOMPOSITIONS = {torch.ops.fastseg.pixel_class_attention.default: _pixel_class_attention_decomposition}


# ----------------------------------------------------------------------------------------------------------------
# Functional entry
# ----------------------------------------------------------------------------------------------------------------
def pixel_class_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    negate: bool = False,
    return_logits_mean: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Pixel -> class attention (ECENet's semantics attention): pixels query K class embeddings.

    ``S = scale * q @ k^T`` per head, ``out = softmax(-S if negate else S, over classes) @ v``. ECENet computes
    ``softmax(rowmax(A) - A)`` which equals ``negate=True``. ``logits_mean[b, k, n]`` is the mean over heads of the
    **scaled, un-negated** logits ``S`` -- ECENet's stage mask (its ``A`` is already multiplied by ``scale``).

    Args:
        q: pixel queries (B, h, N, d).
        k: class keys (B, h, K, d), K <= 256 for the Triton kernel.
        v: class values (B, h, K, d).
        scale: logit scale; ``d ** -0.5`` when None.
        negate: softmax of the negated logits (ECENet).
        return_logits_mean: also return the head-mean logits (B, K, N) in q's dtype.
        impl: ``"auto"`` (custom op: Triton on CUDA, reference on CPU), ``"triton"`` or ``"torch"`` (reference).

    Returns:
        ``out`` (B, h, N, d), or ``(out, logits_mean)`` when ``return_logits_mean``.

    Raises:
        ValueError: on wrong ranks, dtypes, devices or shapes, a non-finite scale, an unknown ``impl``, or
        ``impl="triton"`` beyond the kernel's limits (K > 256, d > 128).
    """
    op = "pixel_class_attention"
    scale = check_qkv(op, q, k, v, scale)
    mode = resolve_impl(impl, q)
    problems = [f"K = {k.shape[2]} > {MAX_CLASSES} classes"] if k.shape[2] > MAX_CLASSES else []
    if q.shape[-1] > MAX_HEAD_DIM:
        problems.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    mode = kernel_fits(op, impl, mode, problems)
    if mode == "torch":
        return pixel_class_attention_ref(q, k, v, scale, negate, return_logits_mean)
    with run_triton_on_cpu(mode == "interpret"):
        out, mean = torch.ops.fastseg.pixel_class_attention(q, k, v, scale, bool(negate), bool(return_logits_mean))
    return (out, mean) if return_logits_mean else out
