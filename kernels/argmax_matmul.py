"""GEMM with an argmax epilogue, fused in Triton: ``argmax_matmul(x, weight, bias) -> (index, value)``.

A 1x1-conv / linear head whose logits are only ever arg-maxed: the GSS token head (2048 -> 8192 tokens).

``argmax_matmul(x (N, C), weight (K, C), bias (K,) | None) -> (index int64 (N,), value float32 (N,))``::

    logits[n, k] = x_n . w_k + b_k          index[n] = argmax_k logits[n, k]          value[n] = logits[n, index[n]]

Forward: one program owns ``BLOCK_N`` rows of x and streams the weight in ``BLOCK_K`` tiles (C in ``BLOCK_C``
tiles); each logits tile is reduced to a running ``(max, argmax)`` per row in registers, so the N x K logits are never
written. HBM traffic is O(N C + K C) (the weight is re-read from L2 per row block).

Numerics: fp32 accumulation; fp32 inputs follow the one dot-precision policy (`_utils.dot_precision`: IEEE, no
TF32); fp16 / bf16 operands are multiplied in their dtype on the GPU and upcast to fp32 in the interpreter (which
cannot multiply bf16). Ties resolve to the lowest index (as ``torch.argmax``): within a tile the smallest column among
equal logits, across tiles a strict ``>`` keeps the earlier one. NaN logits are treated as -inf: a row whose logits
are all NaN / -inf gets index 0 and value -inf.

Backward: none. **Inference only**: back-propagating through the result raises ``RuntimeError`` (train with the
logits and cross-entropy instead).

Limits: any N (N = 0 returns empty outputs), K >= 1, C >= 1 (tiled), K < 2**31; offsets are int64. The CPU path is
the reference, chunked over N so that at most ``REF_CHUNK_ELEMENTS = 2**22`` logits exist at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._utils import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    dot_precision,
    interpreter_enabled,
    pow2,
    ref_chunk_rows,
    resolve_impl,
    run_triton_on_cpu,
    tl,
    triton,
    use_triton,
)

__all__ = ["argmax_matmul", "argmax_matmul_ref", "DECOMPOSITIONS"]


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    op = "argmax_matmul"
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    check_same_device(op, x=x, weight=weight, bias=bias)
    if x.dtype != weight.dtype:
        raise ValueError(f"{op}: x and weight must share a dtype, got {x.dtype} and {weight.dtype}; cast one")
    if weight.shape[0] < 1 or weight.shape[1] < 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x (N, C) and weight (K, C) need the same C >= 1 and K >= 1, got x {tuple(x.shape)} and weight "
            f"{tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, op=op)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have K = {weight.shape[0]} entries, got shape {tuple(bias.shape)}")


# --------------------------------------------------------------------------------------------------------------------
# Reference (oracle, CPU path) and decomposition (export graph)
# --------------------------------------------------------------------------------------------------------------------


def argmax_matmul_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch ``argmax(x @ weight.T + bias)``, in fp32, chunked over N. Inference only (no autograd).

    Args:
        x: (N, C) float32 / float16 / bfloat16 features.
        weight: (K, C) weights of the head, same dtype as ``x``.
        bias: optional (K,) bias.

    Returns:
        ``(index, value)``: int64 (N,) index of the largest logit (lowest index on ties, NaN logits ignored) and the
        float32 largest logit (-inf when every logit of the row is NaN / -inf).
    """
    _check_inputs(x, weight, bias)
    n, k = x.shape[0], weight.shape[0]
    with torch.no_grad():
        w = weight.float()
        b = bias.float() if bias is not None else torch.zeros(k, dtype=torch.float32, device=x.device)
        index = torch.empty(n, dtype=torch.int64, device=x.device)
        value = torch.empty(n, dtype=torch.float32, device=x.device)
        step = ref_chunk_rows(k)
        for start in range(0, n, step):
            logits = torch.addmm(b, x[start : start + step].float(), w.t())
            logits.masked_fill_(torch.isnan(logits), float("-inf"))
            best = torch.argmax(logits, dim=1)
            index[start : start + step] = best
            value[start : start + step] = logits.gather(1, best[:, None]).squeeze(1)
    return index, value


def _argmax_matmul_decomposition(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference without the Python chunk loop: traceable by torch.export, standard ONNX ops only."""
    logits = x.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    logits = torch.where(torch.isnan(logits), torch.full_like(logits, float("-inf")), logits)
    index = torch.argmax(logits, dim=1)
    return index, logits.gather(1, index[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------------------
# The kernels and launchers keep their hand layout (one line per group of arguments): no formatter.
# fmt: off


@triton.jit
def _argmax_matmul_fwd_kernel(
    x_ptr,  # (N, C) any strides
    w_ptr,  # (K, C) any strides
    b_ptr,  # (K,) bias (a dummy pointer when HAS_BIAS is False)
    index_ptr,  # (N,) int64 out
    value_ptr,  # (N,) fp32 out
    N, K, C,
    stride_xn, stride_xc,
    stride_wk, stride_wc,
    stride_bk,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_c = tl.arange(0, BLOCK_C)
    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            cmask = cc < C
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + cc[None, :] * stride_xc,
                         mask=row_ok[:, None] & cmask[None, :], other=0.0)  # fmt: skip
            wt = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_wk + cc[:, None] * stride_wc,
                         mask=col_ok[None, :] & cmask[:, None], other=0.0)  # fmt: skip
            if DOT_FP32:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols * stride_bk, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        logits = tl.where((acc == acc) & col_ok[None, :], acc, float("-inf"))  # NaN logits never win
        tile_max = tl.max(logits, axis=1)
        tile_arg = tl.min(tl.where(logits == tile_max[:, None], cols[None, :], 2147483647), axis=1)
        better = tile_max > best  # strict: ties keep the earlier tile's (lower) index
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_arg, best_idx)
    tl.store(index_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(value_ptr + rows, best, mask=row_ok)


# --------------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------------


def _tile_config(c: int, dtype: torch.dtype) -> dict[str, int]:
    """Fixed (not autotuned) tiles: small ones in the interpreter so that tests cross tile borders cheaply."""
    block_c = pow2(c)
    if interpreter_enabled():
        return {"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_C": min(block_c, 64), "num_warps": 4, "num_stages": 1}
    # Checked by `fastseg bench --static` on sm_80..sm_90: fp32 (IEEE dot on FMA units) spilled with 4 warps and
    # with 8 warps x a 32-wide C tile on sm_80; fp16 / bf16 spilled 16-32 B with a 64-wide C tile.
    if dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_C": min(block_c, 16), "num_warps": 8, "num_stages": 2}
    # C (2048 for the token head) is always tiled here: the x tile is re-read per K tile from L2.
    return {"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_C": min(block_c, 32), "num_warps": 8, "num_stages": 3}


def _argmax_matmul_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(x, weight, bias)
    n, c = x.shape
    k = weight.shape[0]
    index = torch.empty(n, dtype=torch.int64, device=x.device)
    value = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:  # a zero-size grid is not launched the same way on every backend; skip it
        return index, value
    interpret = interpreter_enabled() and not x.is_cuda
    cfg = _tile_config(c, x.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _argmax_matmul_fwd_kernel[grid](
        x, weight, bias if bias is not None else value, index, value,
        n, k, c,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, DOT_FP32=x.dtype == torch.float32 or interpret,
        DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )  # fmt: skip
    return index, value


# fmt: on
# --------------------------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastseg::argmax_matmul", mutates_args=())
def _argmax_matmul_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _argmax_matmul_triton(x, weight, bias)
    return argmax_matmul_ref(x, weight, bias)


@_argmax_matmul_op.register_fake
def _(x, weight, bias):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)


def _argmax_matmul_backward(ctx, grad_index, grad_value):
    raise RuntimeError(
        "fastseg.kernels.argmax_matmul is inference-only and has no gradient; for training compute the logits "
        "(e.g. F.linear / a 1x1 conv) and use cross-entropy on them"
    )


_argmax_matmul_op.register_autograd(_argmax_matmul_backward, setup_context=lambda ctx, inputs, output: None)

# Export: torch.export(...).run_decompositions(DECOMPOSITIONS) replaces the custom op by the dense reference.
DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {
    torch.ops.fastseg.argmax_matmul.default: _argmax_matmul_decomposition,
}


# --------------------------------------------------------------------------------------------------------------------
# Functional entry
# --------------------------------------------------------------------------------------------------------------------


def argmax_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``argmax_k (x @ weight.T + bias)`` with the argmax fused into the GEMM epilogue. Inference only.

    Args:
        x: (N, C) float32 / float16 / bfloat16 features (any strides).
        weight: (K, C) weights, same dtype and device as ``x``.
        bias: optional (K,) bias.
        impl: ``"auto"`` (Triton on CUDA, the chunked reference on CPU), ``"triton"`` or ``"torch"``.

    Returns:
        ``(index, value)``: int64 (N,) argmax (lowest index on ties, NaN logits ignored) and float32 (N,) max logit.

    Raises:
        ValueError: on wrong ranks, dtypes, devices or shapes. Back-propagating through the result raises
        ``RuntimeError``: the op has no gradient.
    """
    _check_inputs(x, weight, bias)
    mode = resolve_impl(impl, x)
    if mode == "torch":
        return argmax_matmul_ref(x, weight, bias)
    if mode == "interpret":
        with run_triton_on_cpu():
            return torch.ops.fastseg.argmax_matmul(x, weight, bias)
    return torch.ops.fastseg.argmax_matmul(x, weight, bias)  # no ContextVar.set() here: torch.compile cannot trace it
