"""Nearest-code search, fused in Triton: ``vq_nearest(z, codebook) -> (index, sqdist)``.

Used by GSS (palette inverse, tokenizer quantisation) and every VQ layer.

``vq_nearest(z (N, D), codebook (K, D)) -> (index int64 (N,), sqdist float32 (N,))``::

    index[n]  = argmin_k ||z_n - e_k||^2          sqdist[n] = ||z_n - e_index[n]||^2

Forward: one program owns ``BLOCK_N`` rows of z and streams the codebook in ``BLOCK_K`` tiles (and D in ``BLOCK_D``
tiles when D is large). The cross term ``z . e`` comes from ``tl.dot`` with fp32 accumulation; the score
``||e||^2 - 2 z . e`` (``||z||^2`` is constant per row, so it is dropped for the argmin) is reduced to a running
``(min, argmin)`` per row in registers. No N x K buffer exists; HBM traffic is O(N D + K D).

Numerics:
  * The expanded form cancels catastrophically when z and the codes sit far from the origin (|z| ~ 1e5) but close to
    each other. Distances are translation invariant, so both sides are first centred on the mean of the (finite)
    codes; the centred problem has small norms and the expanded form stays accurate.
  * ``sqdist`` is not taken from the expanded form: the winner's distance is recomputed exactly as ``sum((z - e)^2)``
    in fp32 from the original inputs, so it is never negative and does not cancel.
  * Ties resolve to the lowest index (as ``torch.argmin``): within a tile the smallest column among equal scores is
    taken, across tiles a strict ``<`` keeps the earlier one.
  * fp16 / bf16 inputs: the centred operands are multiplied in the input dtype with fp32 accumulation on GPU; fp32
    inputs follow the one dot-precision policy (`_utils.dot_precision`: IEEE, no TF32) so fp32 results match the
    reference. Triton's CPU interpreter cannot multiply bf16, so there the operands are upcast to fp32.

NaN / inf policy (the reference, the Triton kernel and the ONNX graph agree):
  * a row of z containing NaN or +-inf gets ``index = 0`` and ``sqdist`` = its exact distance to code 0 (NaN or inf);
  * a code containing NaN / inf never wins for a finite row while a finite code exists (its score is set to +inf,
    and any NaN score is treated as +inf); if no candidate has a finite score the row gets ``index = 0``.

Backward (``sqdist`` only; the index is not differentiable): with ``r_n = z_n - e_index[n]`` and upstream gradient
``g_n``::

    grad_z[n] = 2 g_n r_n          grad_codebook = index_add_k(-2 g_n r_n)

(fp32 atomics on GPU, so the codebook gradient's summation order is not deterministic there).

Limits: any N (N = 0 returns empty outputs), K >= 1 (tested to 65536), D >= 1 (tiled; tested to 512), K < 2**31.
Offsets are int64, so z may exceed 2**31 elements. The reference processes N in chunks so that at most
``REF_CHUNK_ELEMENTS = 2**22`` elements of the N x K matrix exist at once (a 2x-resolution maskige of a 512x512 image
against 150 colours needs about 16 MB, not gigabytes). The CPU path (``impl="auto"`` on CPU tensors,
`_vq_nearest_cpu`) computes the same scores in L2-sized blocks of at most ``CPU_BLOCK_ELEMENTS = 2**19`` (2 MB) with a
running argmin: faster than faiss-cpu's ``IndexFlatL2`` at K 1024 x D 64, slower at GSS's palette (``vq_vs_faiss.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._utils import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    dot_precision,
    gpu_target,
    interpreter_enabled,
    pow2,
    ref_chunk_rows,
    resolve_impl,
    run_on_cpu_threads,
    run_triton_on_cpu,
    tl,
    triton,
    use_triton,
)

__all__ = ["vq_nearest", "vq_nearest_ref", "DECOMPOSITIONS"]


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    op = "vq_nearest"
    check_tensor("z", z, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES, op=op)
    check_same_device(op, z=z, codebook=codebook)
    if z.dtype != codebook.dtype:
        raise ValueError(f"{op}: z and codebook must share a dtype, got {z.dtype} and {codebook.dtype}; cast one")
    if codebook.shape[0] < 1:
        raise ValueError(f"{op}: codebook must hold at least one code, got shape {tuple(codebook.shape)}")
    if codebook.shape[1] < 1 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{op}: z (N, D) and codebook (K, D) need the same D >= 1, got z {tuple(z.shape)} and codebook "
            f"{tuple(codebook.shape)}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Reference (oracle, CPU path) and decomposition (export graph)
# --------------------------------------------------------------------------------------------------------------------


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows holding a NaN or +-inf (x * 0 is NaN exactly there); one ReduceSum + IsNaN in ONNX."""
    return torch.isnan((x.float() * 0.0).sum(-1))


def _prepare_codes(codebook: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Centre, centred codes (in the dot's operand dtype) and their fp32 squared norms.

    The centre is the mean of the finite codes: the translation that keeps the expanded distance form from cancelling.
    A non-finite code becomes a zero row with norm +inf, so its score is +inf for every finite row: it never wins, and
    no NaN score is ever produced by a code (the chunked reference needs no NaN pass for it).
    """
    codes = codebook.float()
    bad = _nonfinite_rows(codes)
    zeros = torch.zeros_like(codes)
    centre = torch.where(bad[:, None], zeros, codes).sum(0) / (~bad).sum().clamp(min=1).to(torch.float32)
    codes_c = torch.where(bad[:, None], zeros, codes - centre).to(dtype)
    code_sq = torch.where(bad, torch.full_like(centre[:1].expand(codes.shape[0]), float("inf")),
                          codes_c.float().pow(2).sum(1))  # fmt: skip
    return centre, codes_c, code_sq


def _exact_sqdist(z: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    diff = z.float() - codebook.float().index_select(0, index)
    return (diff * diff).sum(-1)


def vq_nearest_ref(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch nearest-code search, chunked over N (at most ``REF_CHUNK_ELEMENTS`` scores alive at once).

    Args:
        z: (N, D) float32 / float16 / bfloat16 query vectors.
        codebook: (K, D) codes, same dtype and device as ``z``.

    Returns:
        ``(index, sqdist)``: int64 (N,) index of the nearest code (lowest index on ties) and its float32 squared L2
        distance, recomputed exactly. ``sqdist`` carries autograd to ``z`` and ``codebook``; see the module docstring
        for the NaN / inf policy.
    """
    _check_inputs(z, codebook)
    n, k = z.shape[0], codebook.shape[0]
    with torch.no_grad():
        centre, codes_c, code_sq = _prepare_codes(codebook.detach())
        index = torch.empty(n, dtype=torch.int64, device=z.device)
        step = ref_chunk_rows(k)
        for start in range(0, n, step):
            rows = z[start : start + step].detach().float() - centre
            scores = torch.addmm(code_sq, rows, codes_c.t(), alpha=-2.0)  # ||e||^2 - 2 z.e
            best, chunk_index = torch.min(scores, dim=1)  # first minimum on ties, like argmin
            if bool(torch.isnan(best).any()):  # only from non-finite rows or overflow: NaN never wins
                scores.masked_fill_(torch.isnan(scores), float("inf"))
                chunk_index = torch.argmin(scores, dim=1)
            index[start : start + step] = chunk_index
    return _with_exact_sqdist(z, codebook, index)


def _with_exact_sqdist(
    z: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with NaN / inf go to code 0 (the policy); then every winner's exact distance ``sum((z - e)^2)``."""
    n = z.shape[0]
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or codebook.requires_grad)
    with torch.no_grad():
        if n and not bool(torch.isfinite(z.detach().float().sum())):  # one cheap reduction in the common case
            index.masked_fill_(_nonfinite_rows(z.detach()), 0)
        if not needs_grad:
            # Inference: the exact distances chunk by chunk too, in place (bounded temporaries).
            sqdist = torch.empty(n, dtype=torch.float32, device=z.device)
            codes = codebook.detach().float()
            step = ref_chunk_rows(codebook.shape[0])
            for start in range(0, n, step):
                diff = z[start : start + step].detach().float() - codes.index_select(0, index[start : start + step])
                torch.sum(diff.mul_(diff), dim=1, out=sqdist[start : start + step])
            return index, sqdist
    return index, _exact_sqdist(z, codebook, index)


# The CPU path (what the custom op runs on CPU tensors). The reference above is the readable oracle; this computes the
# same scores (centred codes, ``||e||^2 - 2 z.e`` in fp32, NaN as +inf, lowest index on ties) at GEMM speed:
#   * blocked: a block of rows x codes is scored at a time (at most CPU_BLOCK_ELEMENTS fp32 scores, 2 MB, so the
#     block stays in L2 between the GEMM that writes it and the reduction that reads it), into one preallocated
#     buffer; a codebook wider than CPU_CODE_TILE keeps a running (best, index) per row across code tiles (strict
#     ``<``: an earlier tile keeps a tie);
#   * transposed scores (codes x rows): the argmin then reduces over the outer dimension, which vectorises along the
#     rows. ``torch.min(dim)`` with indices is ~18x slower than ``torch.amin`` on a CPU, so the index comes in two
#     levels: ``amin`` over groups of CPU_GROUP codes (one vectorised pass), the first group holding the row's
#     minimum, then the first code inside that group: the lowest index on ties, as ``argmin``;
#   * threads: the row blocks are shared among `torch.get_num_threads()` threads whose ops run single-threaded
#     (`run_on_cpu_threads`): a block's scores stay in its core's L2, and a call opens no OpenMP region per op, so
#     it does not crawl when OpenMP threads spin beside another busy process.
CPU_BLOCK_ELEMENTS = 2**19
CPU_CODE_TILE = 4096
CPU_GROUP = 32


def _first_min_over_codes(scores: torch.Tensor, lanes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, first argmin) over dim 0 of ``scores`` (codes x rows, codes a multiple of CPU_GROUP); NaN counts as
    +inf."""
    groups = scores.view(scores.shape[0] // CPU_GROUP, CPU_GROUP, scores.shape[1])
    best, group = torch.min(torch.amin(groups, dim=1), dim=0)  # amin propagates NaN, so any NaN score shows here
    if bool(torch.isnan(best).any()):  # only from non-finite rows or overflow: NaN never wins
        scores.masked_fill_(torch.isnan(scores), float("inf"))
        best, group = torch.min(torch.amin(groups, dim=1), dim=0)
    within = groups.permute(2, 0, 1)[lanes, group]  # (rows, CPU_GROUP): each row's winning group
    return best, group * CPU_GROUP + torch.argmin(within, dim=1)


def _vq_nearest_cpu(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: blocked GEMM + two-level running argmin (see above); results as `vq_nearest_ref`."""
    _check_inputs(z, codebook)
    (n, d), k = z.shape, codebook.shape[0]
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or codebook.requires_grad)
    padded = -(-k // CPU_GROUP) * CPU_GROUP  # extra codes: zero rows of norm +inf (never win, as bad codes)
    tile = min(CPU_CODE_TILE, padded)
    rows = max(1, min(n, CPU_BLOCK_ELEMENTS // tile))
    index = torch.empty(n, dtype=torch.int64)
    sqdist = torch.empty(n, dtype=torch.float32)

    def search(starts: list[int]) -> None:  # one thread's row blocks; every op here, none in the caller
        codes = codebook.detach().float()
        centre, codes_c, code_sq = _prepare_codes(codes)  # K x D: cheaper to redo per thread than to share
        codes_c = torch.cat([codes_c, codes_c.new_zeros(padded - k, d)])
        code_sq = torch.cat([code_sq, code_sq.new_full((padded - k,), float("inf"))])[:, None]
        buffer = torch.empty(rows * tile, dtype=torch.float32)
        centred = torch.empty(rows, d, dtype=torch.float32)
        lanes = torch.arange(rows)
        for start in starts:
            m = min(rows, n - start)
            block = z[start : start + m].detach()
            zc = torch.sub(block, centre, out=centred[:m]).t()  # (D, m), fp32
            for k0 in range(0, padded, tile):
                width = min(tile, padded - k0)
                scores = torch.addmm(code_sq[k0 : k0 + width], codes_c[k0 : k0 + width], zc, alpha=-2.0,
                                     out=buffer[: width * m].view(width, m))  # fmt: skip
                tile_best, tile_index = _first_min_over_codes(scores, lanes[:m])
                if k0 == 0:
                    best, block_index = tile_best, tile_index
                else:
                    better = tile_best < best
                    best = torch.where(better, tile_best, best)
                    block_index = torch.where(better, tile_index + k0, block_index)
            if not bool(torch.isfinite(best).all()):  # a row with NaN / inf never has a finite best: code 0
                block_index.masked_fill_(_nonfinite_rows(block), 0)
            index[start : start + m] = block_index
            diff = block.float() - codes.index_select(0, block_index)  # the winner's exact distance
            torch.sum(diff.mul_(diff), dim=1, out=sqdist[start : start + m])

    with torch.no_grad():
        run_on_cpu_threads(search, list(range(0, n, rows)))
    return (index, _exact_sqdist(z, codebook, index)) if needs_grad else (index, sqdist)


def _vq_nearest_decomposition(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference without the Python chunk loop: traceable by torch.export, standard ONNX ops only."""
    centre, codes_c, code_sq = _prepare_codes(codebook)
    scores = code_sq[None, :] - 2.0 * ((z.float() - centre) @ codes_c.t())
    scores = torch.where(torch.isnan(scores), torch.full_like(scores, float("inf")), scores)
    index = torch.argmin(scores, dim=1)
    index = torch.where(_nonfinite_rows(z), torch.zeros_like(index), index)
    return index, _exact_sqdist(z, codebook, index)


def _vq_nearest_backward_ref(
    grad: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_z = 2.0 * (z.float() - codebook.float().index_select(0, index)) * grad.float()[:, None]
    grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
    grad_codebook.index_add_(0, index, -grad_z)
    return grad_z.to(z.dtype).contiguous(), grad_codebook.to(codebook.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------
# The kernels and launchers keep their hand layout (one line per group of arguments): no formatter.
# fmt: off


@triton.jit
def _vq_nearest_fwd_kernel(
    z_ptr,  # (N, D) any strides
    codes_ptr,  # (K, D) the original codebook, any strides (for the exact distance)
    centre_ptr,  # (D,) fp32 mean of the finite codes
    codes_c_ptr,  # (K, D) centred codes, contiguous, in the dot's operand dtype
    code_sq_ptr,  # (K,) fp32 squared norms of the centred codes (+inf for non-finite codes)
    index_ptr,  # (N,) int64 out
    sqdist_ptr,  # (N,) fp32 out
    N, K, D,
    stride_zn, stride_zd,
    stride_codesk, stride_codesd,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)

    # Rows with NaN / inf are sent to code 0 (the documented policy); z * 0 is NaN exactly there.
    probe = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        m = row_ok[:, None] & (dd < D)[None, :]
        zt = tl.load(z_ptr + rows[:, None] * stride_zn + dd[None, :] * stride_zd, mask=m, other=0.0)
        probe += tl.sum(zt.to(tl.float32) * 0.0, axis=1)
    bad = probe != 0.0

    if SINGLE_D:  # the whole row fits one tile: centre it once, keep it in registers for every code tile
        dmask = offs_d < D
        # Its own name: a `zt` here (fp32) would make the distance loop's `zt` (input dtype) loop-carried, which
        # the compiler rejects for fp16 / bf16 ("Loop-carried variable zt ... re-assigned"); the interpreter
        # does not type-check that, only `fastseg bench --static` / tests/test_static.py see it.
        z_row = tl.load(z_ptr + rows[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                        mask=row_ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        zc_full = z_row - tl.load(centre_ptr + offs_d, mask=dmask, other=0.0)[None, :]
        if DOT_FP32:
            zc_full = tl.where(row_ok[:, None] & dmask[None, :], zc_full, 0.0)
        else:
            zc_full = tl.where(row_ok[:, None] & dmask[None, :], zc_full, 0.0).to(codes_c_ptr.dtype.element_ty)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if SINGLE_D:
            et = tl.load(codes_c_ptr + cols.to(tl.int64)[None, :] * D + offs_d[:, None],
                         mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0)  # fmt: skip
            if DOT_FP32:
                et = et.to(tl.float32)
            acc = tl.dot(zc_full, et, acc, input_precision=DOT_PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                m = row_ok[:, None] & dmask[None, :]
                zt = tl.load(z_ptr + rows[:, None] * stride_zn + dd[None, :] * stride_zd, mask=m, other=0.0)
                zc = tl.where(m, zt.to(tl.float32) - tl.load(centre_ptr + dd, mask=dmask, other=0.0)[None, :], 0.0)
                et = tl.load(codes_c_ptr + cols.to(tl.int64)[None, :] * D + dd[:, None],
                             mask=col_ok[None, :] & dmask[:, None], other=0.0)  # fmt: skip
                if DOT_FP32:
                    et = et.to(tl.float32)
                else:
                    zc = zc.to(codes_c_ptr.dtype.element_ty)
                acc = tl.dot(zc, et, acc, input_precision=DOT_PRECISION)
        code_sq = tl.load(code_sq_ptr + cols, mask=col_ok, other=float("inf"))
        scores = code_sq[None, :] - 2.0 * acc
        scores = tl.where((scores == scores) & col_ok[None, :], scores, float("inf"))  # NaN never wins
        tile_min = tl.min(scores, axis=1)
        # lowest column among the tile's minima (explicit, so the tie rule does not hang on tl.argmin's options)
        tile_arg = tl.min(tl.where(scores == tile_min[:, None], cols[None, :], 2147483647), axis=1)
        better = tile_min < best  # strict: an equal score in a later tile keeps the earlier (lower) index
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_arg, best_idx)

    final = tl.where(bad, 0, best_idx).to(tl.int64)
    # Exact distance of the winner from the original inputs: never negative, no cancellation.
    dist = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        m = row_ok[:, None] & (dd < D)[None, :]
        zt = tl.load(z_ptr + rows[:, None] * stride_zn + dd[None, :] * stride_zd, mask=m, other=0.0)
        et = tl.load(codes_ptr + final[:, None] * stride_codesk + dd[None, :] * stride_codesd, mask=m, other=0.0)
        diff = zt.to(tl.float32) - et.to(tl.float32)
        dist += tl.sum(tl.where(m, diff * diff, 0.0), axis=1)
    tl.store(index_ptr + rows, final, mask=row_ok)
    tl.store(sqdist_ptr + rows, dist, mask=row_ok)


@triton.jit
def _vq_nearest_bwd_kernel(
    grad_ptr,  # (N,) upstream gradient of sqdist
    z_ptr,  # (N, D) any strides
    codes_ptr,  # (K, D) any strides
    index_ptr,  # (N,) int64, contiguous
    grad_z_ptr,  # (N, D) out, contiguous
    grad_codes_ptr,  # (K, D) fp32 out, contiguous, zero-initialised (atomic adds)
    N, D,
    stride_gradn,
    stride_zn, stride_zd,
    stride_codesk, stride_codesd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    m = row_ok[:, None] & (dd < D)[None, :]
    g = tl.load(grad_ptr + rows * stride_gradn, mask=row_ok, other=0.0).to(tl.float32)
    idx = tl.load(index_ptr + rows, mask=row_ok, other=0)
    zt = tl.load(z_ptr + rows[:, None] * stride_zn + dd[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
    et = tl.load(codes_ptr + idx[:, None] * stride_codesk + dd[None, :] * stride_codesd, mask=m,
                 other=0.0).to(tl.float32)  # fmt: skip
    gz = 2.0 * (zt - et) * g[:, None]
    tl.store(grad_z_ptr + rows[:, None] * D + dd[None, :], gz.to(grad_z_ptr.dtype.element_ty), mask=m)
    tl.atomic_add(grad_codes_ptr + idx[:, None] * D + dd[None, :], -gz, mask=m)


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def _tile_config(d: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Fixed (not autotuned) tiles per architecture, checked by `fastseg bench --static` (no spills, shared memory
    within the block limit); small ones in the interpreter so that tests cross tile borders cheaply."""
    block_d = pow2(d)
    if interpreter_enabled() and device.type == "cpu":
        return {"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": min(block_d, 64), "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:  # ieee fp32 dot runs on CUDA cores: smaller tiles
        return {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": min(block_d, 32), "num_warps": 4, "num_stages": 2}
    block_d = min(block_d, 256)
    # 163 KB+ per block (A100, Orin, H100): 128 rows, 3 stages (180 registers, no spill at D=256). 99 KB parts
    # (sm_86, L4): 64 rows, 2 stages (128 rows x 2 stages is 97 KB and spilled 4 B on sm_80; 64 rows: 65 KB).
    big = gpu_target(device).smem_per_block >= 160 * 1024
    return {"BLOCK_N": 128 if big else 64, "BLOCK_K": 128 if block_d <= 64 else 64, "BLOCK_D": block_d,
            "num_warps": 8, "num_stages": 3 if big else 2}


def _vq_nearest_triton(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(z, codebook)
    n, d = z.shape
    k = codebook.shape[0]
    index = torch.empty(n, dtype=torch.int64, device=z.device)
    sqdist = torch.empty(n, dtype=torch.float32, device=z.device)
    if n == 0:  # a zero-size grid is not launched the same way on every backend; skip it
        return index, sqdist
    interpret = interpreter_enabled() and not z.is_cuda
    dot_fp32 = z.dtype == torch.float32 or interpret
    # code_sq holds the norms of the operands the dot really sees (rounded to bf16 / fp16 on the GPU fast path)
    centre, codes_c, code_sq = _prepare_codes(codebook, torch.float32 if dot_fp32 else z.dtype)
    centre, codes_c, code_sq = centre.contiguous(), codes_c.contiguous(), code_sq.contiguous()
    cfg = _tile_config(d, z.dtype, z.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _vq_nearest_fwd_kernel[grid](
        z, codebook, centre, codes_c, code_sq, index, sqdist,
        n, k, d,
        z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        SINGLE_D=d <= cfg["BLOCK_D"], DOT_FP32=dot_fp32, DOT_PRECISION=dot_precision(z.dtype), **cfg,
    )  # fmt: skip
    return index, sqdist


def _vq_nearest_backward_triton(
    grad: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = z.shape
    grad_z = torch.empty((n, d), dtype=z.dtype, device=z.device)
    grad_codes = torch.zeros(codebook.shape, dtype=torch.float32, device=z.device)
    if n > 0:
        block_n, block_d = 32, pow2(d, cap=64)
        grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
        _vq_nearest_bwd_kernel[grid](
            grad, z, codebook, index.contiguous(), grad_z, grad_codes,
            n, d,
            grad.stride(0), z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
            BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
    return grad_z, grad_codes.to(codebook.dtype)


# fmt: on
# --------------------------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastseg::vq_nearest", mutates_args=())
def _vq_nearest_op(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(z):
        return _vq_nearest_triton(z, codebook)
    if z.device.type == "cpu":
        return _vq_nearest_cpu(z, codebook)
    return vq_nearest_ref(z, codebook)


@_vq_nearest_op.register_fake
def _(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("fastseg::vq_nearest_backward", mutates_args=())
def _vq_nearest_backward_op(
    grad: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(z):
        return _vq_nearest_backward_triton(grad, z, codebook, index)
    return _vq_nearest_backward_ref(grad, z, codebook, index)


@_vq_nearest_backward_op.register_fake
def _(grad, z, codebook, index):
    return z.new_empty(z.shape), codebook.new_empty(codebook.shape)


def _vq_nearest_setup_context(ctx, inputs, output) -> None:
    z, codebook = inputs
    ctx.save_for_backward(z, codebook, output[0])


def _vq_nearest_backward(ctx, grad_index, grad_sqdist):
    z, codebook, index = ctx.saved_tensors
    if grad_sqdist is None:
        return None, None
    grad_z, grad_codes = torch.ops.fastseg.vq_nearest_backward(grad_sqdist, z, codebook, index)
    return (grad_z if ctx.needs_input_grad[0] else None, grad_codes if ctx.needs_input_grad[1] else None)


_vq_nearest_op.register_autograd(_vq_nearest_backward, setup_context=_vq_nearest_setup_context)

# Export: torch.export(...).run_decompositions(DECOMPOSITIONS) replaces the custom op by the dense reference.
DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {
    torch.ops.fastseg.vq_nearest.default: _vq_nearest_decomposition,
}


# --------------------------------------------------------------------------------------------------------------------
# Functional entry
# --------------------------------------------------------------------------------------------------------------------


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every row of ``z`` under squared L2, without materialising the N x K distance matrix.

    Args:
        z: (N, D) float32 / float16 / bfloat16 query vectors (any strides).
        codebook: (K, D) codes, same dtype and device as ``z``; K >= 1.
        impl: ``"auto"`` (Triton on CUDA, the blocked CPU path on CPU), ``"triton"`` or ``"torch"``.

    Returns:
        ``(index, sqdist)``: int64 (N,) nearest-code index (lowest index on ties; 0 for rows with NaN / inf) and
        float32 (N,) exact squared distance to that code, differentiable with respect to ``z`` and ``codebook``.

    Raises:
        ValueError: on wrong ranks, dtypes, devices, mismatched D, an empty codebook, or an unavailable ``impl``.
    """
    _check_inputs(z, codebook)
    mode = resolve_impl(impl, z)
    if mode == "torch":
        return vq_nearest_ref(z, codebook)
    if mode == "interpret":
        with run_triton_on_cpu():
            return torch.ops.fastseg.vq_nearest(z, codebook)
    return torch.ops.fastseg.vq_nearest(z, codebook)  # no ContextVar.set() here: torch.compile cannot trace it
