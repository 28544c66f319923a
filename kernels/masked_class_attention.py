"""Masked class -> pixel attention, forward and backward in Triton: Mask2Former's masked cross-attention.

Q object / class queries attend to N pixel keys / values. ``mask`` (B, Q, N) bool, **True = attend**; a query row
whose mask is all False attends to every pixel. Mask2Former's ``attn_mask`` has the opposite sense (True = masked
out, from ``sigmoid(mask_logits) < 0.5``), so ``mask = ~attn_mask``, and its "fully masked row -> attend everywhere"
fix-up is built in here. With ``S = scale * q k^T`` restricted to the attended pixels (the others at -inf)::

    out = softmax(S) @ v                    lse = logsumexp(S)   (fp32, kept for the backward)

Backward (FlashAttention-2)::

    delta = rowsum(dout * out) - dlse       P = exp(S - lse)       dS = P * (dout v^T - delta)
    dq = scale * dS @ k                     dk = scale * dS^T @ q   dv = P^T @ dout

Kernels. The forward is an online softmax over N; when Q is small the N axis is split over programs
(Flash-Decoding): each split writes unnormalised fp32 partials with its running max / sum and a combine kernel merges
them. The backward is one kernel in two modes: per pixel tile it writes dk and dv directly (looping over all
queries); per (query tile, pixel chunk) it writes fp32 dq partials that the launcher sums. The mask is read as bytes
in 16-byte aligned rows: when N % 16 != 0 or its rows are unaligned (Mask2Former's 29^2 and 58^2 levels) the
launchers first copy it into rows padded to a multiple of 16 (one pass over the mask, which every head then reads).

NaN / inf policy: none is imposed; non-finite values propagate as in the reference. A NaN or +-inf in query ``i``'s
q row, or in the k row of a pixel that query ``i`` attends to, makes ``out[i]`` NaN; a NaN in k at a pixel that
query ``i`` does not attend to is ignored (its logit is replaced by -inf before the softmax, in both paths). A NaN in
v at any pixel reaches every query (``0 * NaN`` is NaN in the weighted sum, in both paths). The internal ``lse`` of a
poisoned row may be NaN in the kernel where the reference's ``logsumexp`` gives +inf; ``out`` agrees.

Limits: q, k, v of one dtype in {float32, float16, bfloat16}; head dim d <= 128 (any d; the block is padded to a
power of two >= 16); any Q and N (empty inputs give zeros). fp32 inputs follow the one dot-precision policy
(`_utils.dot_precision`: IEEE, no TF32); fp16 / bf16 accumulate in fp32. Triton's interpreter cannot do bf16
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
    check_same_device,
    check_tensor,
    dot_precision,
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

__all__ = ["masked_class_attention", "masked_class_attention_ref", "DECOMPOSITIONS"]


# ----------------------------------------------------------------------------------------------------------------
# Reference (the oracle, the CPU path and the export graph)
# ----------------------------------------------------------------------------------------------------------------
def _attend_mask(mask: Tensor) -> Tensor:
    """Mask2Former's rule: a query that attends to no pixel attends to all of them."""
    return mask | ~mask.any(dim=-1, keepdim=True)


def _masked_class_attention_ref_lse(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
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


def _masked_class_attention_decomposition(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    out, lse = _masked_class_attention_ref_lse(q, k, v, mask, scale)
    return out.contiguous(), lse.contiguous()


def _masked_class_attention_bwd_ref(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The analytic backward of the module docstring, fp32 inside (the CPU kernel of the backward op)."""
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
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
# The kernels and launchers keep their hand layout (one line per group of arguments): no formatter.
# fmt: off
@triton.jit
def _masked_class_attention_fwd_kernel(
    q_ptr,  # (B, H, NQ, D) any strides
    k_ptr,  # (B, H, N, D) any strides
    v_ptr,  # (B, H, N, D) any strides
    mask_ptr,  # (B, NQ, N) uint8 view of the bool mask, any strides; rows readable up to N_MASK (HAS_MASK)
    row_any_ptr,  # (B, NQ) uint8 contiguous: does the query's mask row attend anywhere
    out_ptr,  # (B, H, NQ, D) contiguous out (FINAL)
    lse_ptr,  # (B, H, NQ) fp32 contiguous out (FINAL)
    acc_part_ptr,  # (SPLITS, B, H, NQ, D) fp32 unnormalised partial outputs (not FINAL)
    m_part_ptr,  # (SPLITS, B, H, NQ) fp32 running max, base 2 (not FINAL)
    l_part_ptr,  # (SPLITS, B, H, NQ) fp32 running sum (not FINAL)
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskq, stride_maskn,
    B, H, NQ, N, N_MASK, D, CHUNK_N, scale,
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
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    if HAS_MASK:  # rows with an empty mask attend everywhere (Mask2Former)
        attend_all = tl.load(row_any_ptr + b * NQ + offs_q, mask=q_ok, other=1) == 0
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * LOG2E
    n_lo = split * CHUNK_N
    n_hi = tl.minimum(n_lo + CHUNK_N, N)
    # Mask tiles are read up to the padded row length N_MASK (a multiple of 16 when N is not): a bound the
    # compiler knows to be 16-aligned keeps the byte loads vectorised; columns >= N are dropped by n_ok.
    mask_hi = tl.minimum(n_lo + CHUNK_N, N_MASK)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        nd_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=nd_mask, other=0.0)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # base-2 logits (BLOCK_Q, BLOCK_N)
        valid = n_ok[None, :]
        if HAS_MASK:
            mk = tl.load(mask_ptr + b * stride_maskb + offs_q[:, None] * stride_maskq + offs_n[None, :] * stride_maskn,
                         mask=q_ok[:, None] & (offs_n < mask_hi)[None, :], other=0)
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
        tl.store(out_ptr + (bh * NQ + offs_q[:, None]) * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=qd_mask)
        tl.store(lse_ptr + bh * NQ + offs_q, (m + tl.log2(tl.where(l > 0, l, 1.0))) / LOG2E, mask=q_ok)
    else:
        row = (split * B * H + bh) * NQ + offs_q
        tl.store(acc_part_ptr + row[:, None] * D + offs_d[None, :], acc, mask=qd_mask)
        tl.store(m_part_ptr + row, m, mask=q_ok)
        tl.store(l_part_ptr + row, l, mask=q_ok)


@triton.jit
def _masked_class_attention_combine_kernel(
    acc_part_ptr,  # (SPLITS, B, H, NQ, D) fp32
    m_part_ptr,  # (SPLITS, B, H, NQ) fp32
    l_part_ptr,  # (SPLITS, B, H, NQ) fp32
    out_ptr,  # (B, H, NQ, D) contiguous out
    lse_ptr,  # (B, H, NQ) fp32 contiguous out
    B, H, NQ, D, SPLITS,
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
        m_i = tl.load(m_part_ptr + row, mask=q_ok, other=float("-inf"))
        l_i = tl.load(l_part_ptr + row, mask=q_ok, other=0.0)
        acc_i = tl.load(acc_part_ptr + row[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        m_new = tl.maximum(m, m_i)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp2(m - m_safe), tl.exp2(m_i - m_safe)
        l = l * alpha + l_i * beta
        acc = acc * alpha[:, None] + acc_i * beta[:, None]
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (bh * NQ + offs_q[:, None]) * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=qd_mask)
    tl.store(lse_ptr + bh * NQ + offs_q, (m + tl.log2(tl.where(l > 0, l, 1.0))) / LOG2E, mask=q_ok)


@triton.jit
def _masked_class_attention_bwd_kernel(
    q_ptr,  # (B, H, NQ, D) any strides
    k_ptr,  # (B, H, N, D) any strides
    v_ptr,  # (B, H, N, D) any strides
    mask_ptr,  # (B, NQ, N) uint8 view of the bool mask, any strides; rows readable up to N_MASK (HAS_MASK)
    row_any_ptr,  # (B, NQ) uint8 contiguous
    dout_ptr,  # (B, H, NQ, D) contiguous
    lse_ptr,  # (B, H, NQ) fp32 contiguous (natural log)
    delta_ptr,  # (B, H, NQ) fp32 contiguous: rowsum(dout * out) - dlse
    dk_ptr,  # (B, H, N, D) contiguous out (COMPUTE_DQ False)
    dv_ptr,  # (B, H, N, D) contiguous out (COMPUTE_DQ False)
    dq_part_ptr,  # (SPLITS, B, H, NQ, D) fp32 out (COMPUTE_DQ True)
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskq, stride_maskn,
    B, H, NQ, N, N_MASK, D, CHUNK, scale,
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
    qk_scale = scale * LOG2E
    if COMPUTE_DQ:
        offs_q = pid0 * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < NQ
        qd_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq + offs_d[None, :] * stride_qd,
                    mask=qd_mask, other=0.0)
        do = tl.load(dout_ptr + (bh * NQ + offs_q[:, None]) * D + offs_d[None, :], mask=qd_mask, other=0.0)
        lse2 = tl.load(lse_ptr + bh * NQ + offs_q, mask=q_ok, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + bh * NQ + offs_q, mask=q_ok, other=0.0)
        if HAS_MASK:
            attend_all = tl.load(row_any_ptr + b * NQ + offs_q, mask=q_ok, other=1) == 0
        dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        split = tl.program_id(2).to(tl.int64)
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, N)
        # The dq pass bounds its mask reads by N itself: with the 16-aligned bound N_MASK of the other passes its
        # fp16 / bf16 build on sm_80..sm_89 capped at 128 registers and spilled 8-24 B (static report).
        mask_hi = hi
        step = BLOCK_N
    else:
        offs_n = pid0 * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        nd_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=nd_mask, other=0.0)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=nd_mask, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        mask_hi = N_MASK  # the mask's 16-aligned row bound (see the forward)
        lo = 0
        hi = NQ
        step = BLOCK_Q
    for start in range(lo, hi, step):
        if COMPUTE_DQ:
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            nd_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                        + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)
            v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                        + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
        else:
            offs_q = start + tl.arange(0, BLOCK_Q)
            q_ok = offs_q < NQ
            qd_mask = q_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq
                        + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
            do = tl.load(dout_ptr + (bh * NQ + offs_q[:, None]) * D + offs_d[None, :], mask=qd_mask, other=0.0)
            lse2 = tl.load(lse_ptr + bh * NQ + offs_q, mask=q_ok, other=0.0) * LOG2E
            delta = tl.load(delta_ptr + bh * NQ + offs_q, mask=q_ok, other=0.0)
            if HAS_MASK:
                attend_all = tl.load(row_any_ptr + b * NQ + offs_q, mask=q_ok, other=1) == 0
        valid = q_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            mk = tl.load(mask_ptr + b * stride_maskb + offs_q[:, None] * stride_maskq + offs_n[None, :] * stride_maskn,
                         mask=q_ok[:, None] & (offs_n < mask_hi)[None, :], other=0)
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
        tl.store(dq_part_ptr + row[:, None] * D + offs_d[None, :], dq * scale, mask=qd_mask)
    else:
        out_offs = (bh * N + offs_n[:, None]) * D + offs_d[None, :]
        tl.store(dk_ptr + out_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=nd_mask)
        tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=nd_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _blocks(num_q: int, d: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_Q, BLOCK_N, BLOCK_D, num_warps)`` of the forward or the backward kernels; checked by
    `fastseg bench --static` on sm_80..sm_90: fp32 (FMA dots, operands in registers) needs 8 warps, and 32 x 32
    tiles in the backward, to stay free of spills; the fp16 / bf16 backward spilled with 4 warps."""
    block_d = pow2(d)
    block_q = min(64, pow2(num_q))
    block_n = 64 if block_d <= 64 else 32
    if dtype == torch.float32 and backward:
        block_q, block_n = min(32, block_q), 32
    num_warps = 8 if (dtype == torch.float32 or backward) else 4
    return block_q, block_n, block_d, num_warps


def _mask_args(mask: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...], int]:
    """``(mask as uint8, row_any, mask strides, N_MASK)``: the kernels read mask rows up to ``N_MASK`` columns."""
    if mask is None:
        return q, q, (0, 0, 0), 0  # dummy pointers, never read (HAS_MASK=False)
    row_any = mask.any(dim=-1).to(torch.uint8).contiguous()
    # bool and uint8 share a layout; Triton loads int1 pointers awkwardly, bytes are simple.
    mask_u8 = mask.view(torch.uint8)
    n = mask_u8.shape[-1]
    if n % 16 or any(s % 16 for s in mask_u8.stride()[:-1]):
        # Rows starting on 16-byte boundaries, read up to a 16-aligned bound, let the kernels load mask tiles as
        # vectors and pipeline them through shared memory. With N = 29^2 or 58^2 pixels (Mask2Former's 1/32 and
        # 1/16 levels of 928-pixel crops) the byte loads stayed in registers across pipeline stages: up to 255
        # registers and 300-500 B of spills per thread (static report); the padded copy (one pass over the mask,
        # read by every head) compiles clean. The padding is never initialised: columns >= N are masked out.
        padded = torch.empty((*mask_u8.shape[:-1], -(-n // 16) * 16), dtype=torch.uint8, device=mask.device)
        padded[..., :n].copy_(mask_u8)
        return padded[..., :n], row_any, strides(padded), padded.shape[-1]
    return mask_u8, row_any, strides(mask_u8), n


def _masked_class_attention_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, splits: int | None = None
) -> tuple[Tensor, Tensor]:
    bsz, heads, num_q, d = q.shape
    n = k.shape[2]
    out = q.new_empty(q.shape)
    lse = q.new_empty((bsz, heads, num_q), dtype=torch.float32)
    if out.numel() == 0 or n == 0:  # no query, or no pixel to attend to: zero output, lse = log(0)
        return out.zero_(), lse.fill_(float("-inf"))
    block_q, block_n, block_d, num_warps = _blocks(num_q, d, q.dtype, backward=False)
    q_blocks = triton.cdiv(num_q, block_q)
    n_splits, chunk = num_splits(n, block_n, q_blocks * bsz * heads, target_programs(q.device), splits)
    mask_u8, row_any, mask_strides, n_mask = _mask_args(mask, q)
    final = n_splits == 1
    if final:
        acc_part = m_part = l_part = lse  # unused
    else:
        acc_part = q.new_empty((n_splits, bsz, heads, num_q, d), dtype=torch.float32)
        m_part = q.new_empty((n_splits, bsz, heads, num_q), dtype=torch.float32)
        l_part = torch.empty_like(m_part)
    _masked_class_attention_fwd_kernel[(q_blocks, bsz * heads, n_splits)](
        q, k, v, mask_u8, row_any, out, lse, acc_part, m_part, l_part,
        *strides(q), *strides(k), *strides(v), *mask_strides,
        bsz, heads, num_q, n, n_mask, d, chunk, float(scale),
        HAS_MASK=mask is not None, FINAL=final, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    if not final:
        _masked_class_attention_combine_kernel[(q_blocks, bsz * heads)](
            acc_part, m_part, l_part, out, lse, bsz, heads, num_q, d, n_splits,
            BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4,
        )
    return out, lse


def _masked_class_attention_bwd_triton(
    grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
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
    block_q, block_n, block_d, num_warps = _blocks(num_q, d, q.dtype, backward=True)
    mask_u8, row_any, mask_strides, n_mask = _mask_args(mask, q)
    args = (*strides(q), *strides(k), *strides(v), *mask_strides)
    common = dict(HAS_MASK=mask is not None, DOT_PRECISION=dot_precision(q.dtype), BLOCK_Q=block_q,
                  BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    _masked_class_attention_bwd_kernel[(triton.cdiv(n, block_n), bsz * heads, 1)](
        q, k, v, mask_u8, row_any, grad_out, lse, delta, dk, dv, lse, *args,
        bsz, heads, num_q, n, n_mask, d, n, float(scale), COMPUTE_DQ=False, **common,
    )
    q_blocks = triton.cdiv(num_q, block_q)
    n_splits, chunk = num_splits(n, block_n, q_blocks * bsz * heads, target_programs(q.device), splits)
    dq_part = q.new_empty((n_splits, bsz, heads, num_q, d), dtype=torch.float32)
    _masked_class_attention_bwd_kernel[(q_blocks, bsz * heads, n_splits)](
        q, k, v, mask_u8, row_any, grad_out, lse, delta, dk, dv, dq_part, *args,
        bsz, heads, num_q, n, n_mask, d, chunk, float(scale), COMPUTE_DQ=True, **common,
    )
    dq.copy_(dq_part.sum(0))
    return dq, dk, dv


# fmt: on
# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (CPU kernel: reference, or Triton under run_triton_on_cpu(); CUDA kernel: Triton)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastseg::masked_class_attention", mutates_args=())
def _masked_class_attention_op(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    if use_triton(q):
        return _masked_class_attention_fwd_triton(q, k, v, mask, scale)
    return _masked_class_attention_decomposition(q, k, v, mask, scale)


@_masked_class_attention_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastseg::masked_class_attention_backward", mutates_args=())
def _masked_class_attention_backward_op(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton(q):
        return _masked_class_attention_bwd_triton(grad_out, grad_lse, q, k, v, mask, out, lse, scale)
    return _masked_class_attention_bwd_ref(grad_out, grad_lse, q, k, v, mask, out, lse, scale)


@_masked_class_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, mask, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _masked_class_attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.scale = scale
    # The backward runs outside the forward's run_triton_on_cpu() context: remember which path the forward took.
    ctx.triton_on_cpu = not q.is_cuda and use_triton(q)


def _masked_class_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    with run_triton_on_cpu(ctx.triton_on_cpu):
        dq, dk, dv = torch.ops.fastseg.masked_class_attention_backward(
            grad_out, grad_lse, q, k, v, mask, out, lse, ctx.scale
        )
    return dq, dk, dv, None, None


_masked_class_attention_op.register_autograd(
    _masked_class_attention_backward, setup_context=_masked_class_attention_setup_context
)

# Export: the forward op lowers to its reference (standard MatMul / Softmax / Where ... in ONNX).
DECOMPOSITIONS = {torch.ops.fastseg.masked_class_attention.default: _masked_class_attention_decomposition}


# ----------------------------------------------------------------------------------------------------------------
# Functional entry
# ----------------------------------------------------------------------------------------------------------------
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

    Raises:
        ValueError: on wrong ranks, dtypes, devices or shapes (of q, k, v or the mask), a non-finite scale, an
        unknown ``impl``, or ``impl="triton"`` with a head dim above 128.
    """
    op = "masked_class_attention"
    scale = check_qkv(op, q, k, v, scale)
    if mask is not None:
        check_tensor("mask", mask, ndim=3, dtypes=(torch.bool,), op=op)
        check_same_device(op, q=q, mask=mask)
        expected = (q.shape[0], q.shape[2], k.shape[2])
        if tuple(mask.shape) != expected:
            raise ValueError(f"{op}: mask must have shape (B, Q, N) = {expected}, got {tuple(mask.shape)}")
    mode = resolve_impl(impl, q)
    problems = [f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"] if q.shape[-1] > MAX_HEAD_DIM else []
    mode = kernel_fits(op, impl, mode, problems)
    if mode == "torch":
        return masked_class_attention_ref(q, k, v, mask, scale)
    with run_triton_on_cpu(mode == "interpret"):
        return torch.ops.fastseg.masked_class_attention(q, k, v, mask, scale)[0]
