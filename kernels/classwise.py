"""Class-wise segment reductions and the class-wise masked reconstruction loss (S4MIM, SemPLeS, ECENet).

Groups. Every pixel ``p`` of image ``b`` with a label ``y = labels[b, p]`` in ``[0, K)`` belongs to the group
``(b, y, m)`` where ``m = masked[b, p]`` (**index 0 = visible, 1 = masked**). Pixels whose label is ``ignore_index``
belong to no group: they count nowhere (neither in sums nor in counts) and get zero gradient.

``classwise_reduce`` (one read of the features)::

    sums[b, k, m, c] = sum_{p in group (b, k, m)} features[b, c, p]        (fp32 accumulation; fp64 for fp64 input)
    counts[b, k, m]  = |group (b, k, m)|                                     (int64)
    d sums / d features[b, c, p] = grad_sums[b, y_p, m_p, c]  (0 for ignored pixels)   -- a gather

``classwise_mean(sums, counts)`` divides by ``max(count, 1)``: absent groups are exactly 0 with finite (zero)
gradients; ``counts > 0`` is the "present" mask.

``classwise_masked_recon_loss`` (one pass over pred and target)::

    t            = target, or per-patch normalised target (MAE style, see below) when normalize_target
    err[b, k]    = sum_{p: y_p = k, masked_p} sum_c (pred[b, c, p] - t[b, c, p])^2
    n[b, k]      = |{p: y_p = k, masked_p}|
    per_class    = err / (n * C)        (0 where n = 0)
    total        = sum(per_class) / max(#{(b, k): n[b, k] > 0}, 1)   -- mean over the (image, class) groups present
    d total / d pred[b, c, p] = 2 (pred - t) / (n[b, y_p] C #present)  for masked, labelled pixels, else 0

Per-patch normalisation: the image is cut into ``patch_size x patch_size`` patches anchored at the top-left corner
(the last row / column of patches may be partial). For each patch, over all its pixels *and* channels (regardless of
labels), ``t = (target - mean) / sqrt(var + eps)`` with the unbiased variance (``n - 1`` in the denominator, at least
1) and ``eps = 1e-6``, as in MAE (``target.var(-1)`` of the patchified image). The target never receives a gradient.

Kernels. ``_classwise_reduce_fwd_kernel``: a program owns (split of the pixels, block of BLOCK_G groups, block of
BLOCK_C channels, image). It walks its pixel range in BLOCK_N tiles (software-pipelined); of each tile it reads
the feature rows of the pixels whose group is in its block only (so every feature is read once), and adds
``onehot(groups)^T @ features`` (``tl.dot``) to a [BLOCK_G, BLOCK_C] register accumulator, skipping the dot when the
tile has no pixel of the block. Labels are read once per (group block, channel block); BLOCK_C spans up to 256
channels to keep those re-reads small. Fast mode flushes the accumulator with one atomic add per element;
deterministic mode stores it to a per-split workspace that ``_split_sum_kernel`` reduces in a fixed order (bitwise
identical across runs, no atomics). The workspace is ``B * splits * 2K * C`` fp32 with splits ~ 1024 / (B * blocks).
``_recon_loss_fwd_kernel`` / ``_recon_loss_bwd_kernel``: one program per (patch, image) holds the whole patch
as [BLOCK_P^2] pixel vectors and streams the channels (two passes for the target's mean and variance, one for the
error), so registers do not grow with C; it reduces squared errors per class with a one-hot over the
few class ids present in the patch (atomics in fast mode, per-patch partials in deterministic mode).

Limits: features fp32 / fp16 / bf16 / fp64 (fp64 runs the Triton path in fp32); labels uint8 / int16 / int32 / int64;
``num_classes`` up to 65536; Triton recon loss: at most 16 channels and patch_size at most 64 (the reference has no
such limit). fp32 features use ``tf32x3`` dots on the GPU (about fp32 accuracy). These are training ops: there is no
ONNX translation (``DECOMPOSITIONS`` is empty).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._utils import (
    check_same_device,
    check_tensor,
    gpu_target,
    interpreter_enabled,
    resolve_impl,
    run_triton_on_cpu,
    tl,
    triton,
    use_triton,
)

__all__ = [
    "DECOMPOSITIONS",
    "classwise_masked_recon_loss",
    "classwise_masked_recon_loss_ref",
    "classwise_mean",
    "classwise_patch_mask",
    "classwise_reduce",
    "classwise_reduce_ref",
    "normalize_patches_ref",
]

# Training-only ops: nothing to lower for ONNX, but the name is part of every family's contract.
DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {}

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_MAX_CLASSES = 65536
_MAX_RECON_CHANNELS = 16
_MAX_RECON_PATCH = 64
_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def _check_groups(op: str, labels: torch.Tensor, masked: torch.Tensor, spatial: tuple[int, ...],
                  num_classes: int, ignore_index: int) -> None:
    check_tensor("labels", labels, ndim=3, dtypes=_LABEL_DTYPES, op=op)
    check_tensor("masked", masked, ndim=3, dtypes=(torch.bool,), op=op)
    if tuple(labels.shape) != spatial or tuple(masked.shape) != spatial:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} and masked {tuple(masked.shape)} must both have shape "
                         f"(B, H, W) = {spatial}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"{op}: num_classes must be an int in [1, {_MAX_CLASSES}], got {num_classes!r}")
    if not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
        raise ValueError(f"{op}: ignore_index must be an int outside [0, num_classes={num_classes}) so that it names "
                         f"no class, got {ignore_index!r}")


def _check_label_values(op: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, K)`` that is not ``ignore_index`` (one host sync)."""
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"{op}: labels contain the value {value}, outside [0, num_classes={num_classes}) and not "
                         f"ignore_index={ignore_index}")


def _resolve_deterministic(op: str, deterministic: bool | None, tensor: torch.Tensor) -> bool:
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    if not deterministic and tensor.is_cuda and torch.are_deterministic_algorithms_enabled():
        # Our Triton atomics are invisible to PyTorch's own alert machinery, so raise the same alert by hand.
        message = (f"{op} with deterministic=False uses atomic adds and is not deterministic; pass deterministic=True "
                   f"or None while torch.use_deterministic_algorithms(True) is on")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=3)
        else:
            raise RuntimeError(message)
    return bool(deterministic)


# ----------------------------------------------------------------------------------------------------------------
# References (plain PyTorch: index_add_ / scatter_add)
# ----------------------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat_group_index(labels: torch.Tensor, masked: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Flat index ``b * 2K + 2 * label + masked`` per pixel, or the dump bin ``B * 2K`` for pixels in no group."""
    batch = labels.shape[0]
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)  # ignore_index lies outside [0, K) by contract
    image = torch.arange(batch, device=labels.device).view(batch, 1, 1)
    index = image * (2 * num_classes) + labels * 2 + masked.long()
    return torch.where(valid, index, batch * 2 * num_classes).reshape(-1)


def classwise_reduce_ref(features: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, num_classes: int,
                         ignore_index: int = 255, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `classwise_reduce`: ``(sums (B, K, 2, C), counts (B, K, 2))``.

    ``method="scatter_add"`` scatters the channels-first features into ``(B, C, 2K + 1)`` (no transposed copy; the
    faster one on CPUs, the default there); ``"index_add"`` adds pixel rows into ``(B * 2K + 1, C)`` (the default on
    CUDA, where ``index_add_`` stays available under ``torch.use_deterministic_algorithms``). The extra bin collects
    the ignored pixels and is dropped.
    """
    method = method or ("index_add" if features.is_cuda else "scatter_add")
    batch, channels, height, width = features.shape
    groups = 2 * num_classes
    acc = _acc_dtype(features.dtype)
    if method == "scatter_add":
        valid = (labels >= 0) & (labels < num_classes)  # ignore_index lies outside [0, K) by contract
        group = torch.where(valid, labels.long() * 2 + masked.long(), groups).view(batch, 1, height * width)
        feats = features.to(acc).reshape(batch, channels, height * width)
        sums = feats.new_zeros(batch, channels, groups + 1)
        sums = sums.scatter_add(2, group.expand(batch, channels, height * width), feats)
        counts = torch.zeros(batch, groups + 1, dtype=torch.int64, device=labels.device)
        counts = counts.scatter_add_(1, group[:, 0], torch.ones_like(group[:, 0]))
        sums = sums[..., :groups].reshape(batch, channels, num_classes, 2).permute(0, 2, 3, 1).contiguous()
        return sums, counts[:, :groups].reshape(batch, num_classes, 2).contiguous()
    if method != "index_add":
        raise ValueError(f"classwise_reduce_ref: method must be 'scatter_add' or 'index_add', got {method!r}")
    index = _flat_group_index(labels, masked, num_classes)
    bins = batch * groups + 1
    rows = features.to(acc).permute(0, 2, 3, 1).reshape(index.numel(), channels)
    sums = rows.new_zeros(bins, channels).index_add_(0, index, rows)
    counts = torch.zeros(bins, dtype=torch.int64, device=labels.device).scatter_add_(0, index, torch.ones_like(index))
    return sums[:-1].view(batch, num_classes, 2, channels), counts[:-1].view(batch, num_classes, 2)


def classwise_mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Group means ``sums / counts`` of shape ``(..., C)``; absent groups (count 0) are exactly 0 with zero gradient."""
    present = (counts > 0).unsqueeze(-1)
    # where() rather than relying on empty sums being 0: exact zeros and zero gradient for any sums given.
    return torch.where(present, sums / counts.clamp(min=1).to(sums.dtype).unsqueeze(-1), 0.0)


def normalize_patches_ref(target: torch.Tensor, patch_size: int, eps: float = _NORM_EPS) -> torch.Tensor:
    """MAE-style per-patch normalisation of ``target (B, C, H, W)``: mean and unbiased variance over the channels
    and pixels of each ``patch_size`` patch (edge patches partial), ``(x - mean) / sqrt(var + eps)``."""
    batch, channels, height, width = target.shape
    rows, cols = -(-height // patch_size), -(-width // patch_size)
    pad = (0, cols * patch_size - width, 0, rows * patch_size - height)
    x = F.pad(target, pad).view(batch, channels, rows, patch_size, cols, patch_size)
    inside = F.pad(target.new_ones(1, 1, height, width), pad).view(1, 1, rows, patch_size, cols, patch_size)
    dims = (1, 3, 5)
    n = inside.sum(dims, keepdim=True) * channels
    mean = x.sum(dims, keepdim=True) / n
    centred = (x - mean) * inside
    var = (centred * centred).sum(dims, keepdim=True) / (n - 1).clamp(min=1)
    out = centred / torch.sqrt(var + eps)
    return out.view(batch, channels, rows * patch_size, cols * patch_size)[:, :, :height, :width]


def classwise_masked_recon_loss_ref(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                                    masked: torch.Tensor, num_classes: int, ignore_index: int = 255,
                                    normalize_target: bool = False, patch_size: int = 16
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `classwise_masked_recon_loss` (``index_add_``): ``(per_class (B, K), total ())``."""
    per_class, total, _ = _recon_loss_ref(pred, target, labels, masked, num_classes, normalize_target, patch_size)
    return per_class, total


def _recon_loss_ref(pred, target, labels, masked, num_classes, normalize_target, patch_size):
    batch, channels = pred.shape[:2]
    acc = _acc_dtype(pred.dtype)
    target = target.detach().to(acc)
    if normalize_target:
        target = normalize_patches_ref(target, patch_size)
    err = (pred.to(acc) - target).square().sum(1).reshape(-1)
    labels = labels.long()
    valid = masked & (labels >= 0) & (labels < num_classes)
    image = torch.arange(batch, device=labels.device).view(batch, 1, 1)
    index = torch.where(valid, image * num_classes + labels, batch * num_classes).reshape(-1)
    sums = err.new_zeros(batch * num_classes + 1).index_add_(0, index, err)[:-1].view(batch, num_classes)
    counts = torch.zeros(batch * num_classes + 1, dtype=torch.int64, device=labels.device)
    counts = counts.scatter_add_(0, index, torch.ones_like(index))[:-1].view(batch, num_classes)
    per_class = sums / (counts * channels).clamp(min=1).to(acc)  # absent groups: 0 / 1 = 0
    total = per_class.sum() / (counts > 0).sum().clamp(min=1).to(acc)
    return per_class, total, counts


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _classwise_reduce_fwd_kernel(
    feat_ptr, labels_ptr, masked_ptr, out_ptr, cnt_ptr,
    C, HW, num_classes, num_groups, pix_per_split, num_gblocks,
    stride_fb, stride_fc, stride_fp, stride_lb, stride_lp, stride_mb, stride_mp,
    out_stride_b, out_stride_s, cnt_stride_b, cnt_stride_s,
    DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
):
    split = tl.program_id(0) // num_gblocks
    g_lo = (tl.program_id(0) % num_gblocks) * BLOCK_G
    g_offs = g_lo + tl.arange(0, BLOCK_G)
    c_offs = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = c_offs < C
    b = tl.program_id(2).to(tl.int64)
    acc = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_G,), dtype=tl.int32)
    p_start = split * pix_per_split
    p_end = tl.minimum(p_start + pix_per_split, HW)
    for p0 in tl.range(p_start, p_end, BLOCK_N, num_stages=STAGES):
        p = p0 + tl.arange(0, BLOCK_N)
        p_mask = p < p_end
        lab = tl.load(labels_ptr + b * stride_lb + p * stride_lp, mask=p_mask, other=0)
        msk = tl.load(masked_ptr + b * stride_mb + p * stride_mp, mask=p_mask, other=0).to(tl.int32)
        valid = p_mask & (lab >= 0) & (lab < num_classes)  # compare in the label dtype: no int32 wrap-around
        gid = tl.where(valid, lab.to(tl.int32) * 2 + msk, -1)
        in_block = (gid >= g_lo) & (gid < g_lo + BLOCK_G)
        # Only the rows (pixels) of this program's group block are read, so every feature is read by exactly one
        # group block. The load sits outside the `if` so that it is pipelined (a load under a data-dependent
        # branch is not); only the dot is skipped when the tile has no pixel of the block.
        f = tl.load(feat_ptr + b * stride_fb + c_offs[None, :] * stride_fc + p[:, None] * stride_fp,
                    mask=in_block[:, None] & c_mask[None, :], other=0.0)
        onehot = gid[:, None] == g_offs[None, :]
        if tl.max(in_block.to(tl.int32)) > 0:
            acc = tl.dot(tl.trans(onehot.to(f.dtype)), f, acc, input_precision=DOT_PRECISION)
            cnt += tl.sum(onehot.to(tl.int32), axis=0)
    g_mask = g_offs < num_groups
    out_offs = b * out_stride_b + split * out_stride_s + g_offs[:, None].to(tl.int64) * C + c_offs[None, :]
    cnt_offs = b * cnt_stride_b + split * cnt_stride_s + g_offs
    if DETERMINISTIC:  # exclusive workspace slot: plain stores, zeros included
        tl.store(out_ptr + out_offs, acc, mask=g_mask[:, None] & c_mask[None, :])
        if tl.program_id(1) == 0:
            tl.store(cnt_ptr + cnt_offs, cnt, mask=g_mask)
    else:
        if tl.max(cnt) > 0:  # most (split, group block) pairs saw no pixel: no atomics for them
            tl.atomic_add(out_ptr + out_offs, acc, mask=g_mask[:, None] & c_mask[None, :])
            if tl.program_id(1) == 0:
                tl.atomic_add(cnt_ptr + cnt_offs, cnt, mask=g_mask & (cnt > 0))


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, S, N, BLOCK: tl.constexpr):
    """out[b, i] = sum_s part[b, s, i], s in increasing order (the deterministic second pass)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(part_ptr + (b * S + s) * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + b * N + offs, acc, mask=mask)


@triton.jit
def _classwise_reduce_bwd_kernel(
    gsum_ptr, labels_ptr, masked_ptr, gfeat_ptr, C, HW, num_classes,
    stride_lb, stride_lp, stride_mb, stride_mp,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    p_mask = p < HW
    c_mask = c < C
    lab = tl.load(labels_ptr + b * stride_lb + p * stride_lp, mask=p_mask, other=0)
    msk = tl.load(masked_ptr + b * stride_mb + p * stride_mp, mask=p_mask, other=0).to(tl.int32)
    valid = p_mask & (lab >= 0) & (lab < num_classes)
    gid = tl.where(valid, lab.to(tl.int32) * 2 + msk, 0).to(tl.int64)
    g = tl.load(gsum_ptr + b * (2 * num_classes) * C + gid[:, None] * C + c[None, :],
                mask=valid[:, None] & c_mask[None, :], other=0.0)
    tl.store(gfeat_ptr + b * C * HW + c[None, :] * HW + p[:, None], g.to(gfeat_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _recon_patch_pixels(labels_ptr, masked_ptr, b, patch, patches_w, H, W, num_classes, sl_b, sl_h, sl_w, sm_b, sm_h,
                        sm_w, PATCH: tl.constexpr, BLOCK_P: tl.constexpr):
    """The pixels of one patch: row, column, in-bounds mask and class id (-1 for pixels outside the patch, unmasked
    or unlabelled), as [BLOCK_P^2] vectors."""
    r = tl.arange(0, BLOCK_P * BLOCK_P)
    row = (patch // patches_w) * PATCH + r // BLOCK_P
    col = (patch % patches_w) * PATCH + r % BLOCK_P
    inside = (r // BLOCK_P < PATCH) & (r % BLOCK_P < PATCH) & (row < H) & (col < W)
    lab = tl.load(labels_ptr + b * sl_b + row * sl_h + col * sl_w, mask=inside, other=0)
    msk = tl.load(masked_ptr + b * sm_b + row * sm_h + col * sm_w, mask=inside, other=0)
    sel = inside & (msk != 0) & (lab >= 0) & (lab < num_classes)
    return row, col, inside, tl.where(sel, lab.to(tl.int32), -1)


@triton.jit
def _recon_patch_stats(target_ptr, b, row, col, inside, C, eps, st_b, st_c, st_h, st_w, NORMALIZE: tl.constexpr):
    """Mean and 1 / std of the target over the patch's pixels and channels (two passes over the channels: the
    centred sum of squares does not cancel); (0, 1) without normalisation."""
    mean = 0.0
    rstd = 1.0
    if NORMALIZE:
        t_ptrs = target_ptr + b * st_b + row * st_h + col * st_w
        acc = tl.zeros(row.shape, dtype=tl.float32)
        for _ in range(C):
            acc += tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32)
            t_ptrs += st_c
        n = C * tl.sum(inside.to(tl.float32))
        mean = tl.sum(acc) / n
        t_ptrs = target_ptr + b * st_b + row * st_h + col * st_w
        acc = tl.zeros(row.shape, dtype=tl.float32)
        for _ in range(C):
            centred = tl.where(inside, tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32) - mean, 0.0)
            acc += centred * centred
            t_ptrs += st_c
        rstd = 1.0 / tl.sqrt(tl.sum(acc) / tl.maximum(n - 1.0, 1.0) + eps)
    return mean, rstd


@triton.jit
def _recon_loss_fwd_kernel(
    pred_ptr, target_ptr, labels_ptr, masked_ptr, err_ptr, cnt_ptr,
    C, H, W, num_classes, patches_w, eps, out_stride_b, out_stride_patch,
    sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sl_b, sl_h, sl_w, sm_b, sm_h, sm_w,
    PATCH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    # One program per (patch, image); channels are streamed (one [BLOCK_P^2] vector per channel), so registers do
    # not grow with C: at 16 channels x 64 x 64 the former whole-patch tile spilled 16-33 KB per thread.
    patch = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row, col, inside, k = _recon_patch_pixels(labels_ptr, masked_ptr, b, patch, patches_w, H, W, num_classes,
                                              sl_b, sl_h, sl_w, sm_b, sm_h, sm_w, PATCH, BLOCK_P)
    mean, rstd = _recon_patch_stats(target_ptr, b, row, col, inside, C, eps, st_b, st_c, st_h, st_w, NORMALIZE)
    err = tl.zeros(row.shape, dtype=tl.float32)
    x_ptrs = pred_ptr + b * sp_b + row * sp_h + col * sp_w  # advanced one channel per step (64-bit pointers)
    t_ptrs = target_ptr + b * st_b + row * st_h + col * st_w
    for _ in range(C):
        x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32)
        diff = tl.where(inside, x - (t - mean) * rstd, 0.0)
        err += diff * diff
        x_ptrs += sp_c
        t_ptrs += st_c
    base = b * out_stride_b + patch * out_stride_patch
    # Only the class ids present in this patch: [k_lo, k_hi] (an empty range when no pixel is selected).
    k_lo = tl.min(tl.where(k >= 0, k, num_classes))
    k_hi = tl.max(k)
    for k0 in range(k_lo, k_hi + 1, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        onehot = k[:, None] == ks[None, :]
        e = tl.sum(tl.where(onehot, err[:, None], 0.0), axis=0)
        n = tl.sum(onehot.to(tl.int32), axis=0)
        if DETERMINISTIC:
            tl.store(err_ptr + base + ks, e, mask=ks < num_classes)
            tl.store(cnt_ptr + base + ks, n, mask=ks < num_classes)
        else:
            tl.atomic_add(err_ptr + base + ks, e, mask=n > 0)
            tl.atomic_add(cnt_ptr + base + ks, n, mask=n > 0)


@triton.jit
def _recon_loss_bwd_kernel(
    weight_ptr, pred_ptr, target_ptr, labels_ptr, masked_ptr, grad_ptr,
    C, H, W, num_classes, patches_w, eps,
    sp_b, sp_c, sp_h, sp_w, st_b, st_c, st_h, st_w, sl_b, sl_h, sl_w, sm_b, sm_h, sm_w,
    PATCH: tl.constexpr, BLOCK_P: tl.constexpr, NORMALIZE: tl.constexpr,
):
    patch = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row, col, inside, k = _recon_patch_pixels(labels_ptr, masked_ptr, b, patch, patches_w, H, W, num_classes,
                                              sl_b, sl_h, sl_w, sm_b, sm_h, sm_w, PATCH, BLOCK_P)
    mean, rstd = _recon_patch_stats(target_ptr, b, row, col, inside, C, eps, st_b, st_c, st_h, st_w, NORMALIZE)
    w = tl.load(weight_ptr + b * num_classes + k, mask=k >= 0, other=0.0)  # d loss / d err of the pixel's group
    x_ptrs = pred_ptr + b * sp_b + row * sp_h + col * sp_w  # advanced one channel per step (64-bit pointers)
    t_ptrs = target_ptr + b * st_b + row * st_h + col * st_w
    g_ptrs = grad_ptr + b * C * H * W + row * W + col  # grad is contiguous (B, C, H, W)
    for _ in range(C):
        x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32)
        g = tl.where(inside, 2.0 * w * (x - (t - mean) * rstd), 0.0)
        tl.store(g_ptrs, g.to(grad_ptr.dtype.element_ty), mask=inside)
        x_ptrs += sp_c
        t_ptrs += st_c
        g_ptrs += H * W


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
_REDUCE_BLOCK_N = 128  # pinned (no autotuning): deterministic results must not depend on a tuning run
_SPLIT_SUM_BLOCK = 1024
_TARGET_PROGRAMS = 1024  # enough programs to fill an H100/H200 several times over


# Triton's interpreter pays ~1 ms per block operation whatever the block size, so under it (the CPU tests) a few
# programs with large blocks run much faster than the GPU tiling. Tests flip this to cover the GPU tiling too.
_GPU_TILING_IN_INTERPRETER = False


def _reduce_config(channels: int, groups: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Tiles of the forward reduce: BLOCK_N pixels x BLOCK_G groups x BLOCK_C channels, pipeline depth, target
    number of programs. The labels are read once per (group block, channel block) program, so the channel tile is
    as wide as the registers allow (the whole of C <= 256 in fp16 / bf16: labels read ~10x instead of ~40x at
    K=150, C=256, i.e. ~+17 % over the feature bytes rather than ~+70 %)."""
    pow2_c = max(16, triton.next_power_of_2(channels))
    if interpreter_enabled() and not _GPU_TILING_IN_INTERPRETER:
        return {"BLOCK_N": _REDUCE_BLOCK_N, "BLOCK_G": min(1024, max(16, triton.next_power_of_2(groups))),
                "BLOCK_C": min(256, pow2_c), "STAGES": 1, "num_warps": 4, "target": 1}
    block_g = min(32, max(16, triton.next_power_of_2(groups)))
    # fp32 runs tf32x3 (three tensor-core dots per tile): a narrower channel tile keeps it free of spills.
    block_c = min(128 if dtype == torch.float32 else 256, pow2_c)
    block_n = 32 if dtype == torch.float32 else 64  # fp32 x 64 rows spilled 12-48 B (static report)
    size = 4 if dtype == torch.float32 else 2
    stage_bytes = block_n * block_c * size
    stages = max(1, min(3, (gpu_target(device).smem_per_block - 8 * 1024) // stage_bytes))
    return {"BLOCK_N": block_n, "BLOCK_G": block_g, "BLOCK_C": block_c, "STAGES": stages,
            "num_warps": 8, "target": _TARGET_PROGRAMS}  # 4 warps spilled ~320 B in fp32 (fastseg bench --static)


def _kernel_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """fp64 runs in fp32; bf16 too under the interpreter, whose numpy back end has no bf16 arithmetic."""
    if tensor.dtype == torch.float64 or (tensor.dtype == torch.bfloat16 and interpreter_enabled()):
        return tensor.float()
    return tensor


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for fp16 / bf16 inputs: one-hot x half is exact, accumulation is fp32
    return "ieee" if interpreter_enabled() else "tf32x3"  # ~fp32 accuracy on tensor cores


def _classwise_reduce_triton(features: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, num_classes: int,
                             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, channels, height, width = features.shape
    hw, groups = height * width, 2 * num_classes
    out_dtype = _acc_dtype(features.dtype)
    if batch * hw == 0:
        return (features.new_zeros((batch, num_classes, 2, channels), dtype=out_dtype),
                labels.new_zeros((batch, num_classes, 2), dtype=torch.int64))
    if channels == 0:  # nothing to sum, but the counts are still wanted
        return classwise_reduce_ref(features, labels, masked, num_classes)
    feats = _kernel_dtype(features).reshape(batch, channels, hw)  # a view for contiguous and channels_last inputs
    labels2 = labels.reshape(batch, hw)
    masked2 = masked.reshape(batch, hw).view(torch.uint8)
    cfg = _reduce_config(channels, groups, batch, feats.dtype, features.device)
    target_programs = cfg.pop("target")
    block_g, block_c, block_n = cfg["BLOCK_G"], cfg["BLOCK_C"], cfg["BLOCK_N"]
    num_gblocks, num_cblocks = triton.cdiv(groups, block_g), triton.cdiv(channels, block_c)
    tiles = triton.cdiv(hw, block_n)
    splits = max(1, min(tiles, triton.cdiv(target_programs, batch * num_gblocks * num_cblocks)))
    pix_per_split = triton.cdiv(tiles, splits) * block_n
    splits = triton.cdiv(hw, pix_per_split)
    dev = features.device
    if deterministic:
        part = torch.empty((batch, splits, groups, channels), dtype=torch.float32, device=dev)
        cpart = torch.empty((batch, splits, groups), dtype=torch.int32, device=dev)
        strides = (splits * groups * channels, groups * channels, splits * groups, groups)
    else:
        part = torch.zeros((batch, groups, channels), dtype=torch.float32, device=dev)
        cpart = torch.zeros((batch, groups), dtype=torch.int32, device=dev)
        strides = (groups * channels, 0, groups, 0)
    grid = (splits * num_gblocks, num_cblocks, batch)
    _classwise_reduce_fwd_kernel[grid](
        feats, labels2, masked2, part, cpart,
        channels, hw, num_classes, groups, pix_per_split, num_gblocks,
        feats.stride(0), feats.stride(1), feats.stride(2), labels2.stride(0), labels2.stride(1),
        masked2.stride(0), masked2.stride(1), *strides,
        DETERMINISTIC=deterministic, DOT_PRECISION=_dot_precision(feats.dtype), **cfg,
    )
    if deterministic:
        sums = torch.empty((batch, groups, channels), dtype=torch.float32, device=dev)
        n = groups * channels
        _split_sum_kernel[(triton.cdiv(n, _SPLIT_SUM_BLOCK), batch)](part, sums, splits, n, BLOCK=_SPLIT_SUM_BLOCK)
        counts = cpart.sum(1)  # integer sums are exact in any order
    else:
        sums, counts = part, cpart
    return (sums.view(batch, num_classes, 2, channels).to(out_dtype),
            counts.to(torch.int64).view(batch, num_classes, 2))


def _classwise_reduce_backward_ref(grad_sums, labels, masked, channels, dtype):
    batch, height, width = labels.shape
    num_classes = grad_sums.shape[1]
    index = _flat_group_index(labels, masked, num_classes)
    table = torch.cat([grad_sums.reshape(-1, channels), grad_sums.new_zeros(1, channels)])  # + the dump row
    grad = table[index].view(batch, height, width, channels).permute(0, 3, 1, 2)
    return grad.to(dtype).contiguous()


def _classwise_reduce_backward_triton(grad_sums, labels, masked, channels, dtype):
    batch, height, width = labels.shape
    hw, num_classes = height * width, grad_sums.shape[1]
    grad = torch.empty((batch, channels, height, width), dtype=dtype, device=labels.device)
    if grad.numel() == 0:
        return grad
    out = grad if _kernel_dtype(grad) is grad else torch.empty_like(grad, dtype=torch.float32)
    gsum = grad_sums.float().contiguous()
    labels2, masked2 = labels.reshape(batch, hw), masked.reshape(batch, hw).view(torch.uint8)
    block_c = min(64, max(16, triton.next_power_of_2(channels)))
    grid = (triton.cdiv(hw, _REDUCE_BLOCK_N), triton.cdiv(channels, block_c), batch)
    _classwise_reduce_bwd_kernel[grid](
        gsum, labels2, masked2, out, channels, hw, num_classes,
        labels2.stride(0), labels2.stride(1), masked2.stride(0), masked2.stride(1),
        BLOCK_N=_REDUCE_BLOCK_N, BLOCK_C=block_c, num_warps=8,  # 4 warps: 24 B spilled (fastseg bench --static)
    )
    return grad.copy_(out) if out is not grad else grad


def _recon_tile(normalize_target: bool, patch_size: int) -> int:
    # Without normalisation the patch size plays no role and any tile works; 16 x 16 keeps registers modest.
    return patch_size if normalize_target else 16


def _recon_warps(tile: int, backward: bool = False) -> int:
    # A 64 x 64 patch is 4096 pixels per [BLOCK_P^2] vector: 8 warps keep 16 per thread (the backward spilled 8 B
    # with 8 warps on sm_90 and is clean with 16; static report).
    if tile <= 32:
        return 4
    return 16 if backward else 8


def _recon_class_tile(tile: int) -> int:
    # The per-class reduction materialises a [patch^2, BLOCK_K] one-hot: keep it at 8K elements (a 64 x 64 patch with
    # 16 classes per step spilled 1.9 KB per thread; static report).
    return max(2, min(16, 8192 // triton.next_power_of_2(tile) ** 2))


def _recon_triton_supported(channels: int, normalize_target: bool, patch_size: int) -> bool:
    return channels <= _MAX_RECON_CHANNELS and _recon_tile(normalize_target, patch_size) <= _MAX_RECON_PATCH


def _recon_strides(pred, target, labels, masked):
    return (*pred.stride(), *target.stride(), *labels.stride(), *masked.stride())


def _recon_loss_triton(pred, target, labels, masked, num_classes, normalize_target, patch_size, deterministic):
    batch, channels, height, width = pred.shape
    acc, dev = _acc_dtype(pred.dtype), pred.device
    if pred.numel() == 0:
        counts = torch.zeros((batch, num_classes), dtype=torch.int64, device=dev)
        return counts.to(acc), torch.zeros((), dtype=acc, device=dev), counts
    pred32, target32 = _kernel_dtype(pred), _kernel_dtype(target)
    masked_u8 = masked.view(torch.uint8)
    tile = _recon_tile(normalize_target, patch_size)
    cols = triton.cdiv(width, tile)
    num_patches = triton.cdiv(height, tile) * cols
    if deterministic:  # per-patch partials (zeros where a patch has no pixel of a class), fixed-order sum
        err = torch.zeros((batch, num_patches, num_classes), dtype=torch.float32, device=dev)
        cnt = torch.zeros((batch, num_patches, num_classes), dtype=torch.int32, device=dev)
        out_strides = (num_patches * num_classes, num_classes)
    else:
        err = torch.zeros((batch, num_classes), dtype=torch.float32, device=dev)
        cnt = torch.zeros((batch, num_classes), dtype=torch.int32, device=dev)
        out_strides = (num_classes, 0)
    _recon_loss_fwd_kernel[(num_patches, batch)](
        pred32, target32, labels, masked_u8, err, cnt,
        channels, height, width, num_classes, cols, _NORM_EPS, *out_strides,
        *_recon_strides(pred32, target32, labels, masked_u8),
        PATCH=tile, BLOCK_P=triton.next_power_of_2(tile), BLOCK_K=_recon_class_tile(tile),
        NORMALIZE=normalize_target, DETERMINISTIC=deterministic, num_warps=_recon_warps(tile),
    )
    if deterministic:
        sums = torch.empty((batch, num_classes), dtype=torch.float32, device=dev)
        _split_sum_kernel[(triton.cdiv(num_classes, _SPLIT_SUM_BLOCK), batch)](
            err, sums, num_patches, num_classes, BLOCK=_SPLIT_SUM_BLOCK)
        counts = cnt.sum(1).to(torch.int64)
    else:
        sums, counts = err, cnt.to(torch.int64)
    per_class = sums.to(acc) / (counts * channels).clamp(min=1).to(acc)
    total = per_class.sum() / (counts > 0).sum().clamp(min=1).to(acc)
    return per_class, total, counts


def _recon_loss_backward_ref(weight, pred, target, labels, masked, normalize_target, patch_size):
    batch = pred.shape[0]
    num_classes = weight.shape[1]
    acc = _acc_dtype(pred.dtype)
    target = target.to(acc)
    if normalize_target:
        target = normalize_patches_ref(target, patch_size)
    labels = labels.long()
    valid = masked & (labels >= 0) & (labels < num_classes)
    image = torch.arange(batch, device=labels.device).view(batch, 1, 1)
    index = torch.where(valid, image * num_classes + labels, batch * num_classes)
    w = torch.cat([weight.reshape(-1).to(acc), weight.new_zeros(1, dtype=acc)])[index].unsqueeze(1)
    grad = torch.where(valid.unsqueeze(1), 2.0 * w * (pred.to(acc) - target), 0.0)
    return grad.to(pred.dtype).contiguous()


def _recon_loss_backward_triton(weight, pred, target, labels, masked, normalize_target, patch_size):
    batch, channels, height, width = pred.shape
    grad = torch.empty((batch, channels, height, width), dtype=pred.dtype, device=pred.device)
    if grad.numel() == 0:
        return grad
    pred32, target32 = _kernel_dtype(pred), _kernel_dtype(target)
    out = grad if _kernel_dtype(grad) is grad else torch.empty_like(grad, dtype=torch.float32)
    masked_u8 = masked.view(torch.uint8)
    tile = _recon_tile(normalize_target, patch_size)
    cols = triton.cdiv(width, tile)
    _recon_loss_bwd_kernel[(triton.cdiv(height, tile) * cols, batch)](
        weight.float().contiguous(), pred32, target32, labels, masked_u8, out,
        channels, height, width, weight.shape[1], cols, _NORM_EPS,
        *_recon_strides(pred32, target32, labels, masked_u8),
        PATCH=tile, BLOCK_P=triton.next_power_of_2(tile),
        NORMALIZE=normalize_target, num_warps=_recon_warps(tile, backward=True),
    )
    return grad.copy_(out) if out is not grad else grad


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (CPU kernel: the reference, or Triton's interpreter inside run_triton_on_cpu(); CUDA: Triton)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastseg::classwise_reduce", mutates_args=())
def _classwise_reduce_op(features: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, num_classes: int,
                         ignore_index: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(features):
        return _classwise_reduce_triton(features, labels, masked, num_classes, deterministic)
    return classwise_reduce_ref(features, labels, masked, num_classes, ignore_index)


@_classwise_reduce_op.register_fake
def _(features, labels, masked, num_classes, ignore_index, deterministic):
    batch, channels = features.shape[:2]
    return (features.new_empty((batch, num_classes, 2, channels), dtype=_acc_dtype(features.dtype)),
            labels.new_empty((batch, num_classes, 2), dtype=torch.int64))


@torch.library.custom_op("fastseg::classwise_reduce_backward", mutates_args=())
def _classwise_reduce_backward_op(grad_sums: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor,
                                  channels: int, dtype: torch.dtype) -> torch.Tensor:
    if use_triton(grad_sums):
        return _classwise_reduce_backward_triton(grad_sums, labels, masked, channels, dtype)
    return _classwise_reduce_backward_ref(grad_sums, labels, masked, channels, dtype)


@_classwise_reduce_backward_op.register_fake
def _(grad_sums, labels, masked, channels, dtype):
    batch, height, width = labels.shape
    return labels.new_empty((batch, channels, height, width), dtype=dtype)


def _reduce_setup_context(ctx, inputs, output):
    features, labels, masked = inputs[:3]
    ctx.save_for_backward(labels, masked)
    ctx.channels, ctx.dtype = features.shape[1], features.dtype


def _reduce_backward(ctx, grad_sums, grad_counts):
    labels, masked = ctx.saved_tensors
    grad = torch.ops.fastseg.classwise_reduce_backward(grad_sums, labels, masked, ctx.channels, ctx.dtype)
    return grad, None, None, None, None, None


_classwise_reduce_op.register_autograd(_reduce_backward, setup_context=_reduce_setup_context)


@torch.library.custom_op("fastseg::classwise_masked_recon_loss", mutates_args=())
def _recon_loss_op(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor,
                   num_classes: int, ignore_index: int, normalize_target: bool, patch_size: int,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(pred) and _recon_triton_supported(pred.shape[1], normalize_target, patch_size):
        return _recon_loss_triton(pred, target, labels, masked, num_classes, normalize_target, patch_size,
                                  deterministic)
    per_class, total, counts = _recon_loss_ref(pred, target, labels, masked, num_classes, normalize_target,
                                               patch_size)
    return per_class, total, counts


@_recon_loss_op.register_fake
def _(pred, target, labels, masked, num_classes, ignore_index, normalize_target, patch_size, deterministic):
    acc = _acc_dtype(pred.dtype)
    return (pred.new_empty((pred.shape[0], num_classes), dtype=acc), pred.new_empty((), dtype=acc),
            labels.new_empty((pred.shape[0], num_classes), dtype=torch.int64))


@torch.library.custom_op("fastseg::classwise_masked_recon_loss_backward", mutates_args=())
def _recon_loss_backward_op(weight: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                            masked: torch.Tensor, normalize_target: bool, patch_size: int) -> torch.Tensor:
    if use_triton(pred) and _recon_triton_supported(pred.shape[1], normalize_target, patch_size):
        return _recon_loss_backward_triton(weight, pred, target, labels, masked, normalize_target, patch_size)
    return _recon_loss_backward_ref(weight, pred, target, labels, masked, normalize_target, patch_size)


@_recon_loss_backward_op.register_fake
def _(weight, pred, target, labels, masked, normalize_target, patch_size):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _recon_setup_context(ctx, inputs, output):
    pred, target, labels, masked = inputs[:4]
    ctx.save_for_backward(pred, target, labels, masked, output[2])
    ctx.normalize_target, ctx.patch_size = inputs[6], inputs[7]


def _recon_backward(ctx, grad_per_class, grad_total, grad_counts):
    pred, target, labels, masked, counts = ctx.saved_tensors
    present = counts > 0
    num_present = present.sum().clamp(min=1).to(grad_per_class.dtype)
    # d loss / d err[b, k]: per_class = err / (n C), total = sum(per_class) / #present
    weight = (grad_per_class + grad_total / num_present) / (counts * pred.shape[1]).clamp(min=1)
    weight = torch.where(present, weight, 0.0)
    grad = torch.ops.fastseg.classwise_masked_recon_loss_backward(weight, pred, target, labels, masked,
                                                                  ctx.normalize_target, ctx.patch_size)
    return grad, None, None, None, None, None, None, None, None


_recon_loss_op.register_autograd(_recon_backward, setup_context=_recon_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Functional entries
# ----------------------------------------------------------------------------------------------------------------
def classwise_reduce(features: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, num_classes: int,
                     ignore_index: int = 255, deterministic: bool | None = None, impl: str = "auto",
                     validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, class, visible/masked) feature sums and pixel counts, reading the features once.

    Args:
        features: ``(B, C, H, W)`` fp32 / fp16 / bf16 / fp64, any strides.
        labels: ``(B, H, W)`` integer class ids in ``[0, num_classes)`` or ``ignore_index``.
        masked: ``(B, H, W)`` bool; True puts the pixel in the *masked* group (index 1), False in the visible one (0).
        num_classes: K.
        ignore_index: label of pixels that belong to no group (must lie outside ``[0, K)``).
        deterministic: True: atomic-free two-pass reduction, bitwise identical across runs; False: atomics;
            None: follow ``torch.are_deterministic_algorithms_enabled()``.
        impl: ``"auto" | "triton" | "torch"`` (see ``fastseg.kernels._utils``).
        validate: check label values (one host sync); skipped automatically under ``torch.compile``.

    Returns:
        ``sums (B, K, 2, C)`` in fp32 (fp64 for fp64 features) and ``counts (B, K, 2)`` int64. Means:
        `classwise_mean`. Gradients flow to ``features`` only.

    Raises:
        ValueError: wrong shapes / dtypes / devices, or a label outside ``[0, K)`` that is not ``ignore_index``.
    """
    op = "classwise_reduce"
    check_tensor("features", features, ndim=4, dtypes=_FLOAT_DTYPES, op=op)
    batch, _, height, width = features.shape
    _check_groups(op, labels, masked, (batch, height, width), num_classes, ignore_index)
    check_same_device(op, features=features, labels=labels, masked=masked)
    if validate:
        _check_label_values(op, labels, num_classes, ignore_index)
    det = _resolve_deterministic(op, deterministic, features)
    mode = resolve_impl(impl, features)
    if mode == "torch":
        return classwise_reduce_ref(features, labels, masked, num_classes, ignore_index)
    with run_triton_on_cpu(mode == "interpret"):
        return torch.ops.fastseg.classwise_reduce(features, labels, masked, num_classes, ignore_index, det)


def classwise_masked_recon_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                                masked: torch.Tensor, num_classes: int, ignore_index: int = 255,
                                normalize_target: bool = False, patch_size: int = 16,
                                deterministic: bool | None = None, impl: str = "auto", validate: bool = True
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-wise masked reconstruction loss: MSE over the masked pixels of each (image, class) group.

    ``per_class[b, k]`` is the mean over the masked pixels of class k in image b and over the C channels of
    ``(pred - t)^2`` (0 when the group is empty); ``total`` is the mean of ``per_class`` over the groups with at least
    one masked pixel (0, with zero gradient, when there is none). ``t`` is ``target`` or, with
    ``normalize_target``, the MAE-style per-patch normalised target (module docstring). ``target`` is a constant:
    it never receives a gradient.

    Args:
        pred, target: ``(B, C, H, W)`` (C = 3 for pixels; the Triton path takes C <= 16, the reference any C).
        labels, masked, num_classes, ignore_index, deterministic, impl, validate: as in `classwise_reduce`.
        normalize_target: normalise the target per ``patch_size`` patch (mean / unbiased std over pixels and
            channels, eps 1e-6).
        patch_size: the normalisation patch (Triton: at most 64).

    Returns:
        ``(per_class (B, K), total ())`` in fp32 (fp64 for fp64 pred).
    """
    op = "classwise_masked_recon_loss"
    check_tensor("pred", pred, ndim=4, dtypes=_FLOAT_DTYPES, op=op)
    check_tensor("target", target, ndim=4, dtypes=_FLOAT_DTYPES, op=op)
    if pred.shape != target.shape:
        raise ValueError(f"{op}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    batch, channels, height, width = pred.shape
    _check_groups(op, labels, masked, (batch, height, width), num_classes, ignore_index)
    check_same_device(op, pred=pred, target=target, labels=labels, masked=masked)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    if validate:
        _check_label_values(op, labels, num_classes, ignore_index)
    det = _resolve_deterministic(op, deterministic, pred)
    target = target.detach()
    mode = resolve_impl(impl, pred)
    if mode == "torch":
        return classwise_masked_recon_loss_ref(pred, target, labels, masked, num_classes, ignore_index,
                                               normalize_target, patch_size)
    if impl == "triton" and not _recon_triton_supported(channels, normalize_target, patch_size):
        raise ValueError(f"{op}: the Triton kernel takes at most {_MAX_RECON_CHANNELS} channels and patches of at "
                         f"most {_MAX_RECON_PATCH} pixels, got C={channels}, patch_size={patch_size}; use impl='auto' "
                         f"or 'torch'")
    with run_triton_on_cpu(mode == "interpret"):
        per_class, total, _ = torch.ops.fastseg.classwise_masked_recon_loss(
            pred, target, labels, masked, num_classes, ignore_index, normalize_target, patch_size, det)
    return per_class, total


def classwise_patch_mask(labels: torch.Tensor, patch_size: int, ratio: float,
                         generator: torch.Generator | None = None, ignore_index: int = 255,
                         num_classes: int | None = None) -> torch.Tensor:
    """Mask a random ``ratio`` of the patches of every class region of every image (plain PyTorch, vectorised).

    The image is cut into ``patch_size`` patches anchored at the top-left corner (edge patches partial). Each patch
    belongs to its **majority class** among its labelled pixels (ties: the smallest class id); a patch with only
    ``ignore_index`` pixels belongs to no class and is never masked. For each (image, class) with ``n`` patches,
    ``m = floor(ratio * n + u)`` of them (``u ~ U[0, 1)``, i.e. stochastic rounding: ``E[m] = ratio * n`` and
    ``|m - ratio * n| < 1``) are chosen uniformly without replacement (random keys, ranked per group with two stable
    sorts). A chosen patch masks all its pixels.

    Args:
        labels: ``(B, H, W)`` integer class ids.
        patch_size: masking unit in pixels.
        ratio: fraction of each region's patches to mask, in ``[0, 1]``.
        generator: optional ``torch.Generator`` on ``labels.device`` for reproducible masks.
        ignore_index: label of unlabelled pixels.
        num_classes: K; when None it is taken as the largest label + 1 (one host sync).

    Returns:
        ``masked (B, H, W)`` bool.
    """
    op = "classwise_patch_mask"
    check_tensor("labels", labels, ndim=3, dtypes=_LABEL_DTYPES, op=op)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"{op}: ratio must lie in [0, 1], got {ratio!r}")
    batch, height, width = labels.shape
    dev = labels.device
    if labels.numel() == 0:
        return torch.zeros_like(labels, dtype=torch.bool)
    lab = labels.long()
    if num_classes is None:
        labelled = lab[lab != ignore_index]
        if labelled.numel() and int(labelled.min()) < 0:
            raise ValueError(f"{op}: labels contain the value {int(labelled.min())}, negative and not "
                             f"ignore_index={ignore_index}")
        num_classes = int(labelled.max()) + 1 if labelled.numel() else 1
    else:
        _check_label_values(op, labels, num_classes, ignore_index)
    rows, cols = -(-height // patch_size), -(-width // patch_size)
    num_patches = batch * rows * cols
    valid = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)
    padded = F.pad(torch.where(valid, lab, num_classes), (0, cols * patch_size - width, 0, rows * patch_size - height),
                   value=num_classes)
    per_patch = padded.view(batch, rows, patch_size, cols, patch_size).permute(0, 1, 3, 2, 4)
    per_patch = per_patch.reshape(num_patches, patch_size * patch_size)
    hist = torch.zeros((num_patches, num_classes + 1), dtype=torch.int32, device=dev)
    hist.scatter_add_(1, per_patch, torch.ones_like(per_patch, dtype=torch.int32))
    votes, owner = hist[:, :num_classes].max(1)  # first maximum: ties go to the smallest class id
    image = torch.arange(batch, device=dev).repeat_interleave(rows * cols)
    no_group = batch * num_classes
    group = torch.where(votes > 0, image * num_classes + owner, no_group)
    keys = torch.rand(num_patches, generator=generator, device=dev)
    order = torch.argsort(keys)
    order = order[torch.argsort(group[order], stable=True)]  # by group, then by random key
    sizes = torch.bincount(group, minlength=no_group + 1)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_patches, device=dev) - starts[group[order]]
    jitter = torch.rand(no_group + 1, generator=generator, device=dev, dtype=torch.float64)
    quota = torch.floor(float(ratio) * sizes.double() + jitter).long().clamp(max=sizes)
    chosen = (rank < quota[group]) & (group != no_group)
    chosen = chosen.view(batch, rows, cols)
    pixels = chosen.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return pixels[:, :height, :width].contiguous()
