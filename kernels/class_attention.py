"""Attention between a few class embeddings and many pixels, both directions, forward and backward.

Two ops, both ``torch.library.custom_op`` s with a plain PyTorch reference (``*_ref``), Triton forward and backward
kernels, fakes, autograd and export decompositions (``DECOMPOSITIONS``).

**pixel_class_attention** (ECENet's semantics attention; pixels are queries, K class embeddings are keys/values).
Per batch ``b`` and head ``h``, with ``S = scale * q @ k^T`` (N x K) and ``sign = -1`` when ``negate`` else ``+1``::

    P   = softmax(sign * S, over the K classes)          out = P @ v                   (B, h, N, d)
    M   = mean over heads of S  (scaled, NOT negated)   logits_mean[b, k, n] = M[n, k]  (B, K, N)

ECENet computes ``softmax(rowmax(A) - A)`` with ``A = q k^T * scale`` (= softmax(-A)) and uses the head-mean of the
*positive-sense, scaled* logits ``A`` as the stage mask; ``logits_mean`` is exactly that. Backward (recomputing ``P``
from q and k, class tile by class tile)::

    dP = dout @ v^T     dA = P * (dP - rowsum(P * dP))     dS = sign * dA + dM^T / h
    dq = scale * dS @ k      dk = scale * dS^T @ q       dv = P^T @ dout

One forward program owns a tile of pixels and streams the classes in tiles with an online softmax (shared memory
holds a few k / v tiles, not all K classes); when the mean is requested the program also loops over the heads, which
keeps the head-mean free of atomics (a second pass over class tiles sums ``q_h k_h^T`` over heads). The
backward is two kernels: dq per pixel tile (it also writes the per-pixel log-sum-exp and ``rowsum(P * dP)``), and
dk / dv per class block with the pixels split into chunks whose fp32 partial sums are added afterwards
(deterministic, no atomics).

**masked_class_attention** (Mask2Former's masked cross-attention; Q object / class queries, N pixel keys/values).
``mask`` (B, Q, N) bool, **True = attend**; a query row whose mask is all False attends to every pixel. Mask2Former's
``attn_mask`` has the opposite sense (True = masked out, from ``sigmoid(mask_logits) < 0.5``), so
``mask = ~attn_mask``, and its "fully masked row -> attend everywhere" fix-up is built in here. With ``S = scale * q k^T``
restricted to the attended pixels: ``out = softmax(S) @ v`` and ``lse = logsumexp(S)`` (fp32, kept for the backward).
The forward is an online softmax over N; when Q is small the N axis is split over programs (Flash-Decoding): each
split writes unnormalised fp32 partials with its running max / sum and a combine kernel merges them. Backward (FA2):
``delta = rowsum(dout * out) - dlse``; ``P = exp(S - lse)``; ``dS = P * (dout v^T - delta)``; a kernel per pixel
tile writes dk = scale dS^T q and dv = P^T dout directly (looping over all queries), a split-N kernel writes fp32 dq
partials.

Limits: q, k, v of one dtype in {float32, float16, bfloat16}; head dim d <= 128 (any d; the block is padded to a
power of two >= 16); pixel_class K <= 256. fp32 inputs use IEEE fp32 dot products (no TF32) so fp32 results match
the reference; fp16 / bf16 accumulate in fp32. Triton's interpreter cannot do bf16 arithmetic (CPU tests use fp32 /
fp16). Where a limit is exceeded, ``impl="auto"`` runs the reference and ``impl="triton"`` raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._utils import (
    check_same_device, check_tensor, gpu_target, resolve_impl, run_triton_on_cpu, tl, triton, use_triton,
)  # fmt: skip

__all__ = [
    "pixel_class_attention",
    "pixel_class_attention_ref",
    "masked_class_attention",
    "masked_class_attention_ref",
    "DECOMPOSITIONS",
    "MAX_CLASSES",
    "MAX_HEAD_DIM",
]

MAX_CLASSES = 256  # pixel_class_attention's tested range (its kernels stream class tiles)
MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# references (the oracle, the CPU path and the export graph)
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


def _attend_mask(mask: Tensor) -> Tensor:
    """Mask2Former's rule: a query that attends to no pixel attends to all of them."""
    return mask | ~mask.any(dim=-1, keepdim=True)


def _masked_class_attention_ref_lse(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float
) -> tuple[Tensor, Tensor]:
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, h, Q, N) in fp32 for the softmax
    if mask is not None:
        logits = logits.masked_fill(~_attend_mask(mask)[:, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse[..., None]).to(v.dtype)
    return torch.matmul(weights, v), lse


def masked_class_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Plain PyTorch masked class->pixel attention; see `masked_class_attention` for the maths and shapes."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _masked_class_attention_ref_lse(q, k, v, mask, scale)[0]


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: pixel -> class
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _pixel_class_attention_fwd_kernel(
    Q, K, V, Out, Mean,
    sqb, sqh, sqn, sqd, skb, skh, skk, skd, svb, svh, svk, svd,
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
    for i in tl.range(0, HEADS_PER_PROGRAM, num_stages=1):
        h = (h0 + i).to(tl.int64)
        q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=nd_mask, other=0.0)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for k0 in tl.range(0, NUM_K, BLOCK_K, num_stages=KV_STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < NUM_K
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(K + b * skb + h * skh + offs_k[:, None] * skk + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_k[:, None] * svk + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (BLOCK_N, BLOCK_K), fp32
            if NEGATE:
                a = -s * 1.4426950408889634
            else:
                a = s * 1.4426950408889634
            a = tl.where(k_ok[None, :], a, float("-inf"))  # padded classes get no weight
            # Every class tile holds at least one real class, so m_new is finite and alpha is 0 on the first tile.
            m_new = tl.maximum(m, tl.max(a, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(a - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m = m_new
        # Out is contiguous (B, H, N, D).
        o_ptrs = Out + ((b * H + h) * N + offs_n[:, None]) * D + offs_d[None, :]
        tl.store(o_ptrs, (acc / l[:, None]).to(Out.dtype.element_ty), mask=nd_mask)
    if WRITE_MEAN:
        # Head-mean of the logits per class tile: sum_h q_h k_h^T is one reduction over (head, d); the q tiles are
        # re-read from L1 / L2 per class tile (K / BLOCK_K times), which costs no HBM traffic.
        for k0 in range(0, NUM_K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < NUM_K
            kv_mask = k_ok[:, None] & d_ok[None, :]
            mean_acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for i in tl.range(0, HEADS_PER_PROGRAM, num_stages=KV_STAGES):
                h = (h0 + i).to(tl.int64)
                q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=nd_mask,
                            other=0.0)
                k = tl.load(K + b * skb + h * skh + offs_k[:, None] * skk + offs_d[None, :] * skd, mask=kv_mask,
                            other=0.0)
                mean_acc = tl.dot(q, tl.trans(k), mean_acc, input_precision=DOT_PRECISION)
            m_ptrs = Mean + (b * NUM_K + offs_k[None, :]) * N + offs_n[:, None]  # Mean is contiguous (B, K, N)
            tl.store(m_ptrs, (mean_acc * (scale * inv_heads)).to(Mean.dtype.element_ty),
                     mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _pixel_class_attention_bwd_dq_kernel(
    Q, K, V, DO, DMean, DQ, LSE2, Delta,
    sqb, sqh, sqn, sqd, skb, skh, skk, skd, svb, svh, svk, svd,
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
    q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=nd_mask, other=0.0)
    row = (bh * N + offs_n[:, None]) * D + offs_d[None, :]  # DO and DQ are contiguous (B, H, N, D)
    do = tl.load(DO + row, mask=nd_mask, other=0.0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in tl.range(0, NUM_K, BLOCK_K, num_stages=KV_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < NUM_K
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_k[:, None] * skk + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_k[:, None] * svk + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if NEGATE:
            a = -s * 1.4426950408889634
        else:
            a = s * 1.4426950408889634
        a = tl.where(k_ok[None, :], a, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, axis=1))  # finite: every tile holds a real class
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(a - m_new[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        l = l * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * dp, axis=1)
        m = m_new
    lse2 = m + tl.log2(l)
    delta = t / l
    dq = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k0 in tl.range(0, NUM_K, BLOCK_K, num_stages=KV_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < NUM_K
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_k[:, None] * skk + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_k[:, None] * svk + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if NEGATE:
            a = -s * 1.4426950408889634
        else:
            a = s * 1.4426950408889634
        p = tl.where(k_ok[None, :], tl.exp2(a - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if NEGATE:
            ds = -ds
        if HAS_DMEAN:
            dm = tl.load(DMean + (b * NUM_K + offs_k[None, :]) * N + offs_n[:, None],
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            ds += dm.to(tl.float32) * inv_heads
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    tl.store(DQ + row, (dq * scale).to(DQ.dtype.element_ty), mask=nd_mask)
    tl.store(LSE2 + bh * N + offs_n, lse2, mask=n_ok)  # base-2 log-sum-exp of sign * S
    tl.store(Delta + bh * N + offs_n, delta, mask=n_ok)


@triton.jit
def _pixel_class_attention_bwd_dkdv_kernel(
    Q, K, V, DO, DMean, LSE2, Delta, DKPart, DVPart,
    sqb, sqh, sqn, sqd, skb, skh, skk, skd, svb, svh, svk, svd,
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
    k = tl.load(K + b * skb + h * skh + offs_k[:, None] * skk + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_k[:, None] * svk + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_KB, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_KB, BLOCK_D), dtype=tl.float32)
    n_lo = split * CHUNK_N
    n_hi = tl.minimum(n_lo + CHUNK_N, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        nd_mask = n_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=nd_mask, other=0.0)
        do = tl.load(DO + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=nd_mask, other=0.0)
        lse2 = tl.load(LSE2 + bh * N + offs_n, mask=n_ok, other=0.0)
        delta = tl.load(Delta + bh * N + offs_n, mask=n_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (BLOCK_N, BLOCK_KB)
        if NEGATE:
            a = -s * 1.4426950408889634
        else:
            a = s * 1.4426950408889634
        nk_mask = n_ok[:, None] & k_ok[None, :]
        p = tl.where(nk_mask, tl.exp2(a - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if NEGATE:
            ds = -ds
        if HAS_DMEAN:
            dm = tl.load(DMean + (b * NUM_K + offs_k[None, :]) * N + offs_n[:, None], mask=nk_mask, other=0.0)
            ds += dm.to(tl.float32) * inv_heads
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    # Partials are contiguous fp32 (SPLIT, B, H, K, D); the launcher sums them over SPLIT.
    part = ((split * B * H + bh) * NUM_K + offs_k[:, None]) * D + offs_d[None, :]
    tl.store(DKPart + part, dk * scale, mask=kv_mask)
    tl.store(DVPart + part, dv, mask=kv_mask)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: class -> pixel, masked
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _masked_class_attention_fwd_kernel(
    Q, K, V, Mask, RowAny, Out, LSE, AccPart, MPart, LPart,
    sqb, sqh, sqq, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smq, smn,
    B, H, NQ, N, D, CHUNK_N, scale,
    HAS_MASK: tl.constexpr, FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    b, h = bh // H, bh % H
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok, d_ok = offs_q < NQ, offs_d < D
    qd_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_q[:, None] * sqq + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
    if HAS_MASK:
        # Rows with an empty mask attend everywhere (Mask2Former); RowAny is contiguous (B, Q) uint8.
        attend_all = tl.load(RowAny + b * NQ + offs_q, mask=q_ok, other=1) == 0
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    n_lo = split * CHUNK_N
    n_hi = tl.minimum(n_lo + CHUNK_N, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        nd_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # base-2 logits (BLOCK_Q, BLOCK_N)
        valid = n_ok[None, :]
        if HAS_MASK:
            mk = tl.load(Mask + b * smb + offs_q[:, None] * smq + offs_n[None, :] * smn,
                         mask=q_ok[:, None] & n_ok[None, :], other=0)
            valid = valid & ((mk != 0) | attend_all[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row with nothing attended in this chunk so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    if FINAL:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(Out + (bh * NQ + offs_q[:, None]) * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=qd_mask)
        tl.store(LSE + bh * NQ + offs_q, (m + tl.log2(tl.where(l > 0, l, 1.0))) / 1.4426950408889634, mask=q_ok)
    else:
        row = (split * B * H + bh) * NQ + offs_q
        tl.store(AccPart + row[:, None] * D + offs_d[None, :], acc, mask=qd_mask)
        tl.store(MPart + row, m, mask=q_ok)
        tl.store(LPart + row, l, mask=q_ok)


@triton.jit
def _masked_class_attention_combine_kernel(
    AccPart, MPart, LPart, Out, LSE, B, H, NQ, D, SPLITS,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok, d_ok = offs_q < NQ, offs_d < D
    qd_mask = q_ok[:, None] & d_ok[None, :]
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for split in range(0, SPLITS):
        row = (split * B * H + bh) * NQ + offs_q
        m_i = tl.load(MPart + row, mask=q_ok, other=float("-inf"))
        l_i = tl.load(LPart + row, mask=q_ok, other=0.0)
        acc_i = tl.load(AccPart + row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        m_new = tl.maximum(m, m_i)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp2(m - m_safe), tl.exp2(m_i - m_safe)
        l = l * alpha + l_i * beta
        acc = acc * alpha[:, None] + acc_i * beta[:, None]
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(Out + (bh * NQ + offs_q[:, None]) * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=qd_mask)
    tl.store(LSE + bh * NQ + offs_q, (m + tl.log2(tl.where(l > 0, l, 1.0))) / 1.4426950408889634, mask=q_ok)


@triton.jit
def _masked_class_attention_bwd_kernel(
    Q, K, V, Mask, RowAny, DO, LSE, Delta, DK, DV, DQPart,
    sqb, sqh, sqq, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smq, smn,
    B, H, NQ, N, D, CHUNK, scale,
    HAS_MASK: tl.constexpr, COMPUTE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """COMPUTE_DQ=False: one program per pixel tile, looping over all queries, writes dk and dv.
    COMPUTE_DQ=True: one program per (query tile, pixel chunk ``CHUNK``), writes an fp32 dq partial."""
    pid0 = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qk_scale = scale * 1.4426950408889634
    if COMPUTE_DQ:
        offs_q = pid0 * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < NQ
        qd_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_q[:, None] * sqq + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
        do = tl.load(DO + (bh * NQ + offs_q[:, None]) * D + offs_d[None, :], mask=qd_mask, other=0.0)
        lse2 = tl.load(LSE + bh * NQ + offs_q, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + bh * NQ + offs_q, mask=q_ok, other=0.0)
        if HAS_MASK:
            attend_all = tl.load(RowAny + b * NQ + offs_q, mask=q_ok, other=1) == 0
        dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        split = tl.program_id(2).to(tl.int64)
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, N)
        step = BLOCK_N
    else:
        offs_n = pid0 * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        nd_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        lo = 0
        hi = NQ
        step = BLOCK_Q
    for start in range(lo, hi, step):
        if COMPUTE_DQ:
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            nd_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
        else:
            offs_q = start + tl.arange(0, BLOCK_Q)
            q_ok = offs_q < NQ
            qd_mask = q_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * sqb + h * sqh + offs_q[:, None] * sqq + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
            do = tl.load(DO + (bh * NQ + offs_q[:, None]) * D + offs_d[None, :], mask=qd_mask, other=0.0)
            lse2 = tl.load(LSE + bh * NQ + offs_q, mask=q_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(Delta + bh * NQ + offs_q, mask=q_ok, other=0.0)
            if HAS_MASK:
                attend_all = tl.load(RowAny + b * NQ + offs_q, mask=q_ok, other=1) == 0
        valid = q_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            mk = tl.load(Mask + b * smb + offs_q[:, None] * smq + offs_n[None, :] * smn, mask=valid, other=0)
            valid = valid & ((mk != 0) | attend_all[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_Q, BLOCK_N)
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if COMPUTE_DQ:
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    if COMPUTE_DQ:
        row = (split * B * H + bh) * NQ + offs_q
        tl.store(DQPart + row[:, None] * D + offs_d[None, :], dq * scale, mask=qd_mask)
    else:
        out_ptrs = (bh * N + offs_n[:, None]) * D + offs_d[None, :]  # DK, DV contiguous (B, H, N, D)
        tl.store(DK + out_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
        tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=nd_mask)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 callers expect fp32 results: TF32 would cost ~1e-3 relative error (DESIGN.md, reliability.md 1.5).
    return "ieee" if dtype == torch.float32 else "tf32"


def _target_programs(device: torch.device) -> int:
    """How many programs fill the device: ~4 waves of SMs on a GPU; a few on the interpreter so that the split
    paths are exercised by the CPU tests without making them slow."""
    if device.type in ("cuda", "meta"):  # meta: a launch planned for a GPU by fastseg.bench.static
        return 4 * gpu_target(device).sm_count
    return 4


def _num_splits(n: int, block_n: int, other_programs: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """Split N into chunks (multiples of ``block_n``) so that ``other_programs * splits`` fills the device;
    returns ``(splits, chunk)``."""
    tiles = triton.cdiv(n, block_n)
    if splits is None:
        splits = max(1, min(tiles, _target_programs(device) // max(other_programs, 1)))
    splits = max(1, min(int(splits), tiles))
    chunk = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(n, chunk), chunk


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _pca_fwd_config(num_k: int, d: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Forward tiles: pixels x class tile, k / v tiles pipelined as deep as the GPU's shared memory allows."""
    block_d = _pow2(d)
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units with operands in registers: small tiles, no spills
        block_n, block_k = 32, min(32, _pow2(num_k))
    else:
        block_n, block_k = 64, min(64, _pow2(num_k))
    size = torch.finfo(dtype).bits // 8
    per_stage = 2 * block_k * block_d * size  # one k and one v tile
    fixed = (block_n * block_d + block_n * block_k) * size  # q and p staged through shared memory for the dots
    budget = gpu_target(device).smem_per_block
    stages = max(1, min(3, (budget - fixed) // per_stage))
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
    cfg = _pca_fwd_config(num_k, d, q.dtype, q.device)
    heads_per_program = heads if return_logits_mean else 1  # the head-mean needs every head in one program
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), bsz * (heads // heads_per_program))
    _pixel_class_attention_fwd_kernel[grid](
        q, k, v, out, mean, *_strides(q), *_strides(k), *_strides(v),
        heads, n, num_k, d, heads_per_program, float(scale), 1.0 / heads,
        NEGATE=bool(negate), WRITE_MEAN=bool(return_logits_mean), DOT_PRECISION=_dot_precision(q.dtype), **cfg,
    )
    return out, mean


def _pixel_class_attention_bwd_triton(
    grad_out: Tensor, grad_mean: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool,
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
    cfg = _pca_fwd_config(num_k, d, q.dtype, q.device)  # same tiles as the forward (two k / v tiles per stage)
    block_d = cfg["BLOCK_D"]
    lse2 = q.new_empty((bsz, heads, n), dtype=torch.float32)
    delta = torch.empty_like(lse2)
    common = dict(NEGATE=bool(negate), HAS_DMEAN=has_dmean, DOT_PRECISION=_dot_precision(q.dtype))
    _pixel_class_attention_bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), bsz * heads)](
        q, k, v, grad_out, dmean, dq, lse2, delta, *_strides(q), *_strides(k), *_strides(v),
        heads, n, num_k, d, float(scale), 1.0 / heads, **cfg, **common,
    )
    # dk / dv: a class block of BLOCK_KB accumulates two (BLOCK_KB, d) fp32 tiles while streaming pixel tiles;
    # fp32 (FMA dots, operands in registers) and d = 128 take half-size tiles, and all need 8 warps, to stay free
    # of spills (4 warps spilled ~0.5 KB in bf16 and ~1 KB in fp32 on sm_80..sm_90; static report).
    small = q.dtype == torch.float32 or block_d > 64
    block_kb = min(32 if small else 64, _pow2(num_k))
    k_blocks = triton.cdiv(num_k, block_kb)
    block_n_kv = 32 if small else 64
    n_splits, chunk = _num_splits(n, block_n_kv, k_blocks * bsz * heads, q.device, splits)
    dk_part = q.new_empty((n_splits, bsz, heads, num_k, d), dtype=torch.float32)
    dv_part = torch.empty_like(dk_part)
    _pixel_class_attention_bwd_dkdv_kernel[(k_blocks, bsz * heads, n_splits)](
        q, k, v, grad_out, dmean, lse2, delta, dk_part, dv_part, *_strides(q), *_strides(k), *_strides(v),
        bsz, heads, n, num_k, d, chunk, float(scale), 1.0 / heads,
        BLOCK_N=block_n_kv, BLOCK_KB=block_kb, BLOCK_D=block_d, num_warps=8, **common,
    )
    dk.copy_(dk_part.sum(0))
    dv.copy_(dv_part.sum(0))
    return dq, dk, dv


def _mca_blocks(num_q: int, d: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_Q, BLOCK_N, BLOCK_D, num_warps)``; checked by `fastseg bench --static` on sm_80..sm_90: fp32 (FMA
    dots, operands in registers) needs 8 warps, and 32 x 32 tiles in the backward, to stay free of spills; the
    fp16 / bf16 backward spilled with 4 warps."""
    block_d = _pow2(d)
    block_q = min(64, _pow2(num_q))
    block_n = 64 if block_d <= 64 else 32
    if dtype == torch.float32 and backward:
        block_q, block_n = min(32, block_q), 32
    num_warps = 8 if (dtype == torch.float32 or backward) else 4
    return block_q, block_n, block_d, num_warps


def _mask_args(mask: Optional[Tensor], q: Tensor) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    if mask is None:
        return q, q, (0, 0, 0)  # dummy pointers, never read (HAS_MASK=False)
    row_any = mask.any(dim=-1).to(torch.uint8).contiguous()
    # bool and uint8 share a layout; Triton loads int1 pointers awkwardly, bytes are simple.
    return mask.view(torch.uint8), row_any, _strides(mask)


def _masked_class_attention_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, splits: int | None = None
) -> tuple[Tensor, Tensor]:
    bsz, heads, num_q, d = q.shape
    n = k.shape[2]
    out = q.new_empty(q.shape)
    lse = q.new_empty((bsz, heads, num_q), dtype=torch.float32)
    if out.numel() == 0 or n == 0:  # no query, or no pixel to attend to: zero output, lse = log(0)
        return out.zero_(), lse.fill_(float("-inf"))
    block_q, block_n, block_d, num_warps = _mca_blocks(num_q, d, q.dtype, backward=False)
    q_blocks = triton.cdiv(num_q, block_q)
    n_splits, chunk = _num_splits(n, block_n, q_blocks * bsz * heads, q.device, splits)
    mask_u8, row_any, mask_strides = _mask_args(mask, q)
    final = n_splits == 1
    if final:
        acc_part = m_part = l_part = lse  # unused
    else:
        acc_part = q.new_empty((n_splits, bsz, heads, num_q, d), dtype=torch.float32)
        m_part = q.new_empty((n_splits, bsz, heads, num_q), dtype=torch.float32)
        l_part = torch.empty_like(m_part)
    _masked_class_attention_fwd_kernel[(q_blocks, bsz * heads, n_splits)](
        q, k, v, mask_u8, row_any, out, lse, acc_part, m_part, l_part,
        *_strides(q), *_strides(k), *_strides(v), *mask_strides,
        bsz, heads, num_q, n, d, chunk, float(scale),
        HAS_MASK=mask is not None, FINAL=final, DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    if not final:
        _masked_class_attention_combine_kernel[(q_blocks, bsz * heads)](
            acc_part, m_part, l_part, out, lse, bsz, heads, num_q, d, n_splits,
            BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4,
        )
    return out, lse


def _masked_class_attention_bwd_triton(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
    out: Tensor, lse: Tensor, scale: float, splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, heads, num_q, d = q.shape
    n = k.shape[2]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out.contiguous()
    # rowsum(P * dP) = rowsum(dout * out); a gradient on lse adds P * dlse to dS, i.e. subtracts it from delta.
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None and grad_lse.numel() > 0:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    block_q, block_n, block_d, num_warps = _mca_blocks(num_q, d, q.dtype, backward=True)
    mask_u8, row_any, mask_strides = _mask_args(mask, q)
    args = (*_strides(q), *_strides(k), *_strides(v), *mask_strides)
    common = dict(HAS_MASK=mask is not None, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_Q=block_q,
                  BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    _masked_class_attention_bwd_kernel[(triton.cdiv(n, block_n), bsz * heads, 1)](
        q, k, v, mask_u8, row_any, grad_out, lse, delta, dk, dv, lse, *args,
        bsz, heads, num_q, n, d, n, float(scale), COMPUTE_DQ=False, **common,
    )
    q_blocks = triton.cdiv(num_q, block_q)
    n_splits, chunk = _num_splits(n, block_n, q_blocks * bsz * heads, q.device, splits)
    dq_part = q.new_empty((n_splits, bsz, heads, num_q, d), dtype=torch.float32)
    _masked_class_attention_bwd_kernel[(q_blocks, bsz * heads, n_splits)](
        q, k, v, mask_u8, row_any, grad_out, lse, delta, dk, dv, dq_part, *args,
        bsz, heads, num_q, n, d, chunk, float(scale), COMPUTE_DQ=True, **common,
    )
    dq.copy_(dq_part.sum(0))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# reference backward passes (the CPU kernels of the backward ops; analytic, fp32 inside)
# ----------------------------------------------------------------------------------------------------------------
def _pixel_class_attention_bwd_ref(
    grad_out: Tensor, grad_mean: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool
) -> tuple[Tensor, Tensor, Tensor]:
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


def _masked_class_attention_bwd_ref(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
    out: Tensor, lse: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    qf, kf, vf, go = q.float(), k.float(), v.float(), grad_out.float()
    logits = (qf @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~_attend_mask(mask)[:, None], float("-inf"))
    p = torch.exp(logits - lse[..., None])
    delta = (go * out.float()).sum(-1, keepdim=True)
    if grad_lse is not None and grad_lse.numel() > 0:
        delta = delta - grad_lse.float()[..., None]
    ds = p * (go @ vf.transpose(-1, -2) - delta)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    dv = p.transpose(-1, -2) @ go
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------------------------
# custom ops (CPU kernel: reference, or Triton under run_triton_on_cpu(); CUDA kernel: Triton)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastseg::pixel_class_attention", mutates_args=())
def _pixel_class_attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool, return_logits_mean: bool
) -> tuple[Tensor, Tensor]:
    if use_triton(q):
        return _pixel_class_attention_fwd_triton(q, k, v, scale, negate, return_logits_mean)
    return _pixel_class_attention_decomposition(q, k, v, scale, negate, return_logits_mean)


def _pixel_class_attention_decomposition(
    q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool, return_logits_mean: bool
) -> tuple[Tensor, Tensor]:
    out, mean = pixel_class_attention_ref(q, k, v, scale, negate, return_logits_mean=True)
    if not return_logits_mean:
        return out.contiguous(), q.new_empty((0,))
    return out.contiguous(), mean.contiguous()


@_pixel_class_attention_op.register_fake
def _(q, k, v, scale, negate, return_logits_mean):
    mean_shape = (q.shape[0], k.shape[2], q.shape[2]) if return_logits_mean else (0,)
    return q.new_empty(q.shape), q.new_empty(mean_shape)


@torch.library.custom_op("fastseg::pixel_class_attention_backward", mutates_args=())
def _pixel_class_attention_backward_op(
    grad_out: Tensor, grad_mean: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, scale: float, negate: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(q):
        return _pixel_class_attention_bwd_triton(grad_out, grad_mean, q, k, v, scale, negate)
    return _pixel_class_attention_bwd_ref(grad_out, grad_mean, q, k, v, scale, negate)


@_pixel_class_attention_backward_op.register_fake
def _(grad_out, grad_mean, q, k, v, scale, negate):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _pca_setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, negate, _ = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale, ctx.negate = scale, negate
    # The backward runs outside the forward's run_triton_on_cpu() context: remember which path the forward took.
    ctx.triton_on_cpu = not q.is_cuda and use_triton(q)


def _pca_backward(ctx, grad_out, grad_mean):
    q, k, v = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    with run_triton_on_cpu(ctx.triton_on_cpu):
        dq, dk, dv = torch.ops.fastseg.pixel_class_attention_backward(
            grad_out, grad_mean, q, k, v, ctx.scale, ctx.negate
        )
    return dq, dk, dv, None, None, None


_pixel_class_attention_op.register_autograd(_pca_backward, setup_context=_pca_setup_context)


@torch.library.custom_op("fastseg::masked_class_attention", mutates_args=())
def _masked_class_attention_op(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float
) -> tuple[Tensor, Tensor]:
    if use_triton(q):
        return _masked_class_attention_fwd_triton(q, k, v, mask, scale)
    return _masked_class_attention_decomposition(q, k, v, mask, scale)


def _masked_class_attention_decomposition(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float
) -> tuple[Tensor, Tensor]:
    out, lse = _masked_class_attention_ref_lse(q, k, v, mask, scale)
    return out.contiguous(), lse.contiguous()


@_masked_class_attention_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastseg::masked_class_attention_backward", mutates_args=())
def _masked_class_attention_backward_op(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
    out: Tensor, lse: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(q):
        return _masked_class_attention_bwd_triton(grad_out, grad_lse, q, k, v, mask, out, lse, scale)
    return _masked_class_attention_bwd_ref(grad_out, grad_lse, q, k, v, mask, out, lse, scale)


@_masked_class_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, mask, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _mca_setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.scale = scale
    ctx.triton_on_cpu = not q.is_cuda and use_triton(q)


def _mca_backward(ctx, grad_out, grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    with run_triton_on_cpu(ctx.triton_on_cpu):
        dq, dk, dv = torch.ops.fastseg.masked_class_attention_backward(
            grad_out, grad_lse, q, k, v, mask, out, lse, ctx.scale
        )
    return dq, dk, dv, None, None


_masked_class_attention_op.register_autograd(_mca_backward, setup_context=_mca_setup_context)

# Export: each forward op lowers to its reference (standard MatMul / Softmax / Where / ReduceMean ... in ONNX).
DECOMPOSITIONS = {
    torch.ops.fastseg.pixel_class_attention.default: _pixel_class_attention_decomposition,
    torch.ops.fastseg.masked_class_attention.default: _masked_class_attention_decomposition,
}


# ----------------------------------------------------------------------------------------------------------------
# functional entries
# ----------------------------------------------------------------------------------------------------------------
def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=_DTYPES, op=op)
    check_same_device(op, q=q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape (B, h, L, d), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{op}: q (B, h, *, d) and k / v (B, h, *, d) must agree on batch, heads and head dim, got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if scale is None:
        return q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _kernel_fits(op: str, impl: str, mode: str, problems: list[str]) -> str:
    """Downgrade to the reference where the Triton kernel's limits are exceeded (impl='auto'), or refuse
    (impl='triton')."""
    if mode == "torch" or not problems:
        return mode
    if impl == "triton":
        raise ValueError(f"{op}: the Triton kernel does not support {'; '.join(problems)}; use impl='torch' or 'auto'")
    return "torch"


def pixel_class_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, negate: bool = False,
    return_logits_mean: bool = False, impl: str = "auto",
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
    """
    op = "pixel_class_attention"
    scale = _check_qkv(op, q, k, v, scale)
    mode = resolve_impl(impl, q)
    problems = [f"K = {k.shape[2]} > {MAX_CLASSES} classes"] if k.shape[2] > MAX_CLASSES else []
    if q.shape[-1] > MAX_HEAD_DIM:
        problems.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    mode = _kernel_fits(op, impl, mode, problems)
    if mode == "torch":
        return pixel_class_attention_ref(q, k, v, scale, negate, return_logits_mean)
    with run_triton_on_cpu(mode == "interpret"):
        out, mean = torch.ops.fastseg.pixel_class_attention(q, k, v, scale, bool(negate), bool(return_logits_mean))
    return (out, mean) if return_logits_mean else out


def masked_class_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None, impl: str = "auto"
) -> Tensor:
    """Masked class -> pixel attention (Mask2Former's masked cross-attention): Q queries attend to N pixels.

    ``out = softmax(scale * q @ k^T restricted to mask) @ v``. ``mask[b, i, n] = True`` means query ``i`` **may
    attend** to pixel ``n`` (the sense of SDPA's boolean ``attn_mask``). Mask2Former's ``attn_mask`` is the opposite
    (True = masked out, ``sigmoid(mask_logits) < 0.5``): pass ``mask = ~attn_mask`` (i.e. ``sigmoid >= 0.5``). A
    query whose mask row is all False attends to every pixel, as Mask2Former's decoder enforces. The same mask is
    used by every head.

    Args:
        q: queries (B, h, Q, d).
        k: pixel keys (B, h, N, d).
        v: pixel values (B, h, N, d).
        mask: bool (B, Q, N) or None (attend everywhere). It receives no gradient.
        scale: logit scale; ``d ** -0.5`` when None.
        impl: ``"auto"`` (custom op: Triton on CUDA, reference on CPU), ``"triton"`` or ``"torch"`` (reference).

    Returns:
        (B, h, Q, d) in q's dtype.
    """
    op = "masked_class_attention"
    scale = _check_qkv(op, q, k, v, scale)
    if mask is not None:
        check_tensor("mask", mask, ndim=3, dtypes=(torch.bool,), op=op)
        check_same_device(op, q=q, mask=mask)
        expected = (q.shape[0], q.shape[2], k.shape[2])
        if tuple(mask.shape) != expected:
            raise ValueError(f"{op}: mask must have shape (B, Q, N) = {expected}, got {tuple(mask.shape)}")
    mode = resolve_impl(impl, q)
    problems = [f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"] if q.shape[-1] > MAX_HEAD_DIM else []
    mode = _kernel_fits(op, impl, mode, problems)
    if mode == "torch":
        return masked_class_attention_ref(q, k, v, mask, scale)
    with run_triton_on_cpu(mode == "interpret"):
        return torch.ops.fastseg.masked_class_attention(q, k, v, mask, scale)[0]
