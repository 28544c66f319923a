"""Class-wise segment reductions in Triton: ``classwise_reduce`` (sums and counts) and ``classwise_mean``.

Used by S4MIM (masked / visible feature aggregation), SemPLeS and ECENet (class embeddings from masks).

Groups. Every pixel ``p`` of image ``b`` with a label ``y = labels[b, p]`` in ``[0, K)`` belongs to the group
``(b, y, m)`` where ``m = masked[b, p]`` (**index 0 = visible, 1 = masked**). Pixels whose label is ``ignore_index``
belong to no group: they count nowhere (neither in sums nor in counts) and get zero gradient. One read of the
features::

    sums[b, k, m, c] = sum_{p in group (b, k, m)} features[b, c, p]        (fp32 accumulation; fp64 for fp64 input)
    counts[b, k, m]  = |group (b, k, m)|                                     (int64)
    d sums / d features[b, c, p] = grad_sums[b, y_p, m_p, c]  (0 for ignored pixels)   -- a gather

``classwise_mean(sums, counts)`` divides by ``max(count, 1)``: absent groups are exactly 0 with finite (zero)
gradients; ``counts > 0`` is the "present" mask.

Kernels. ``_classwise_reduce_fwd_kernel``: a program owns (split of the pixels, block of BLOCK_G groups, block of
BLOCK_C channels, image). It walks its pixel range in BLOCK_N tiles (software-pipelined); of each tile it reads
the feature rows of the pixels whose group is in its block only (so every feature is read once) and adds
``onehot(groups)^T @ features`` (``tl.dot``) to a [BLOCK_G, BLOCK_C] register accumulator, skipping the dot when
the tile has no pixel of the block. Labels are read once per (group block, channel block); BLOCK_C spans up to 256
channels to keep those re-reads few. Fast mode flushes the accumulator with one atomic add per element;
deterministic mode stores it to a per-split workspace that `_utils.split_sum` reduces in a fixed order (bitwise
identical across runs, no atomics). The workspace is ``B * splits * 2K * C`` fp32 with splits ~ 1024 / (B * blocks).
``_classwise_reduce_bwd_kernel`` gathers ``grad_sums`` back to the pixels.

NaN / inf policy. Features of ignored pixels are never read (no effect on any output, in both paths). A NaN or +-inf
feature of a labelled pixel makes that channel of its own group's sum non-finite in both paths; counts are never
affected. The Triton path may in addition turn the same channel of *other* groups of that image NaN (``0 * NaN``
inside the one-hot product, for groups that share a pixel tile and a group block with the pixel), so with
non-finite labelled features only the finite entries of the Triton result are meaningful: NaN is never hidden, but
it may spread. Both paths agree exactly on which counts and which finite sums they produce (tests check it).

Limits: features fp32 / fp16 / bf16 / fp64 (fp64 runs the Triton path in fp32); labels uint8 / int16 / int32 /
int64; ``num_classes`` up to 65536. fp32 features follow the one dot-precision policy (`_utils.dot_precision`:
IEEE); one-hot x half is exact with fp32 accumulation. A training op: no ONNX translation (``DECOMPOSITIONS`` is
empty).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._utils import (
    FLOAT_DTYPES,
    acc_dtype,
    check_groups,
    check_label_values,
    check_same_device,
    check_tensor,
    dot_precision,
    gpu_target,
    interpreter_enabled,
    kernel_dtype,
    num_splits,
    pow2,
    resolve_deterministic,
    resolve_impl,
    run_triton_on_cpu,
    split_sum,
    tl,
    triton,
    use_triton,
)

__all__ = ["DECOMPOSITIONS", "classwise_mean", "classwise_reduce", "classwise_reduce_ref"]

# A training op: nothing to lower for ONNX, but the name is part of every op's contract.
DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {}

_DTYPES = (*FLOAT_DTYPES, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch: scatter_add / index_add_)
# ----------------------------------------------------------------------------------------------------------------
def _flat_group_index(labels: torch.Tensor, masked: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Flat index ``b * 2K + 2 * label + masked`` per pixel, or the dump bin ``B * 2K`` for pixels in no group."""
    batch = labels.shape[0]
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)  # ignore_index lies outside [0, K) by contract
    image = torch.arange(batch, device=labels.device).view(batch, 1, 1)
    index = image * (2 * num_classes) + labels * 2 + masked.long()
    return torch.where(valid, index, batch * 2 * num_classes).reshape(-1)


def classwise_reduce_ref(
    features: torch.Tensor,
    labels: torch.Tensor,
    masked: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    method: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `classwise_reduce`: ``(sums (B, K, 2, C), counts (B, K, 2))``.

    ``method="scatter_add"`` scatters the channels-first features into ``(B, C, 2K + 1)`` (no transposed copy; the
    faster one on CPUs, the default there); ``"index_add"`` adds pixel rows into ``(B * 2K + 1, C)`` (the default on
    CUDA, where ``index_add_`` stays available under ``torch.use_deterministic_algorithms``). The extra bin collects
    the ignored pixels and is dropped.
    """
    method = method or ("index_add" if features.is_cuda else "scatter_add")
    batch, channels, height, width = features.shape
    groups = 2 * num_classes
    acc = acc_dtype(features.dtype)
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


def _classwise_reduce_backward_ref(grad_sums, labels, masked, channels, dtype):
    batch, height, width = labels.shape
    num_classes = grad_sums.shape[1]
    index = _flat_group_index(labels, masked, num_classes)
    table = torch.cat([grad_sums.reshape(-1, channels), grad_sums.new_zeros(1, channels)])  # + the dump row
    grad = table[index].view(batch, height, width, channels).permute(0, 3, 1, 2)
    return grad.to(dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
# The kernels and launchers keep their hand layout (one line per group of arguments): no formatter.
# fmt: off
@triton.jit
def _classwise_reduce_fwd_kernel(
    feat_ptr,  # (B, C, HW) any strides (in the kernel dtype)
    labels_ptr,  # (B, HW) integer labels, any strides
    masked_ptr,  # (B, HW) uint8 view of the bool mask, any strides
    sums_ptr,  # fp32 out: (B, G, C) zero-initialised (fast) or (B, SPLITS, G, C) workspace (deterministic)
    counts_ptr,  # int32 out: (B, G) zero-initialised (fast) or (B, SPLITS, G) workspace (deterministic)
    C, HW, num_classes, num_groups, pix_per_split, num_gblocks,
    stride_featb, stride_featc, stride_featp,
    stride_labelsb, stride_labelsp,
    stride_maskedb, stride_maskedp,
    stride_sumsb, stride_sumss,
    stride_countsb, stride_countss,
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
        lab = tl.load(labels_ptr + b * stride_labelsb + p * stride_labelsp, mask=p_mask, other=0)
        msk = tl.load(masked_ptr + b * stride_maskedb + p * stride_maskedp, mask=p_mask, other=0).to(tl.int32)
        valid = p_mask & (lab >= 0) & (lab < num_classes)  # compare in the label dtype: no int32 wrap-around
        gid = tl.where(valid, lab.to(tl.int32) * 2 + msk, -1)
        in_block = (gid >= g_lo) & (gid < g_lo + BLOCK_G)  # never true for ignored pixels (gid = -1)
        # Only the rows (pixels) of this program's group block are read, so every feature is read by exactly one
        # group block; ignored pixels load 0, so their features (NaN included) never reach a sum through 0 * x.
        # The load sits outside the `if` so that it is pipelined (a load under a data-dependent branch is not);
        # only the dot is skipped when the tile has no pixel of the block.
        f = tl.load(feat_ptr + b * stride_featb + c_offs[None, :] * stride_featc + p[:, None] * stride_featp,
                    mask=in_block[:, None] & c_mask[None, :], other=0.0)
        onehot = gid[:, None] == g_offs[None, :]
        if tl.max(in_block.to(tl.int32)) > 0:
            acc = tl.dot(tl.trans(onehot.to(f.dtype)), f, acc, input_precision=DOT_PRECISION)
            cnt += tl.sum(onehot.to(tl.int32), axis=0)
    g_mask = g_offs < num_groups
    out_offs = b * stride_sumsb + split * stride_sumss + g_offs[:, None].to(tl.int64) * C + c_offs[None, :]
    cnt_offs = b * stride_countsb + split * stride_countss + g_offs
    if DETERMINISTIC:  # exclusive workspace slot: plain stores, zeros included
        tl.store(sums_ptr + out_offs, acc, mask=g_mask[:, None] & c_mask[None, :])
        if tl.program_id(1) == 0:
            tl.store(counts_ptr + cnt_offs, cnt, mask=g_mask)
    else:
        if tl.max(cnt) > 0:  # most (split, group block) pairs saw no pixel: no atomics for them
            tl.atomic_add(sums_ptr + out_offs, acc, mask=g_mask[:, None] & c_mask[None, :])
            if tl.program_id(1) == 0:
                tl.atomic_add(counts_ptr + cnt_offs, cnt, mask=g_mask & (cnt > 0))


@triton.jit
def _classwise_reduce_bwd_kernel(
    grad_sums_ptr,  # (B, 2K, C) fp32 contiguous
    labels_ptr,  # (B, HW) integer labels, any strides
    masked_ptr,  # (B, HW) uint8 view of the bool mask, any strides
    grad_feat_ptr,  # (B, C, HW) contiguous out
    C, HW, num_classes,
    stride_labelsb, stride_labelsp,
    stride_maskedb, stride_maskedp,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    p_mask = p < HW
    c_mask = c < C
    lab = tl.load(labels_ptr + b * stride_labelsb + p * stride_labelsp, mask=p_mask, other=0)
    msk = tl.load(masked_ptr + b * stride_maskedb + p * stride_maskedp, mask=p_mask, other=0).to(tl.int32)
    valid = p_mask & (lab >= 0) & (lab < num_classes)
    gid = tl.where(valid, lab.to(tl.int32) * 2 + msk, 0).to(tl.int64)
    g = tl.load(grad_sums_ptr + b * (2 * num_classes) * C + gid[:, None] * C + c[None, :],
                mask=valid[:, None] & c_mask[None, :], other=0.0)
    tl.store(grad_feat_ptr + b * C * HW + c[None, :] * HW + p[:, None], g.to(grad_feat_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
_BLOCK_N = 128  # pinned (no autotuning): deterministic results must not depend on a tuning run
_TARGET_PROGRAMS = 1024  # enough programs to fill an H100/H200 several times over

# Triton's interpreter pays ~1 ms per block operation whatever the block size, so under it (the CPU tests) a few
# programs with large blocks run much faster than the GPU tiling. Tests flip this to cover the GPU tiling too.
_GPU_TILING_IN_INTERPRETER = False


def _reduce_config(channels: int, groups: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Tiles of the forward reduce: BLOCK_N pixels x BLOCK_G groups x BLOCK_C channels, pipeline depth, target
    number of programs. The labels are read once per (group block, channel block) program, so the channel tile is
    as wide as the registers allow (all of C <= 256 in fp16 / bf16: labels read ~10x instead of ~40x at K=150,
    C=256, i.e. ~+17 % over the feature bytes rather than ~+70 %). Checked by `fastseg bench --static`: fp32 (three
    tf32 dots per tile) spilled with 4 warps and with 64-pixel tiles.

    Per architecture: on sm_90 the fp16 / bf16 dot takes 64-group tiles, the smallest M tile ``wgmma`` accepts
    (with 8 warps = two warpgroups splitting the channels); 32-group tiles lower to ``mma.sync``. The wider tile
    also halves the label re-reads (5 group blocks instead of 10 at K=150)."""
    if interpreter_enabled() and not _GPU_TILING_IN_INTERPRETER and device.type == "cpu":
        return {"BLOCK_N": _BLOCK_N, "BLOCK_G": pow2(groups, cap=1024), "BLOCK_C": pow2(channels, cap=256),
                "STAGES": 1, "num_warps": 4, "target": 1}
    target = gpu_target(device)
    half = dtype != torch.float32
    block_c = pow2(channels, cap=256 if half else 128)
    block_n = 64 if half else 32
    block_g = pow2(groups, cap=64 if half and target.capability[0] >= 9 else 32)
    stage_bytes = block_n * block_c * (2 if half else 4)
    stages = max(1, min(3, (target.smem_per_block - 8 * 1024) // stage_bytes))
    return {"BLOCK_N": block_n, "BLOCK_G": block_g, "BLOCK_C": block_c, "STAGES": stages,
            "num_warps": 8, "target": _TARGET_PROGRAMS}


def _classwise_reduce_triton(features: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, num_classes: int,
                             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, channels, height, width = features.shape
    hw, groups = height * width, 2 * num_classes
    out_dtype = acc_dtype(features.dtype)
    if batch * hw == 0:
        return (features.new_zeros((batch, num_classes, 2, channels), dtype=out_dtype),
                labels.new_zeros((batch, num_classes, 2), dtype=torch.int64))
    if channels == 0:  # nothing to sum, but the counts are still wanted
        return classwise_reduce_ref(features, labels, masked, num_classes)
    feats = kernel_dtype(features).reshape(batch, channels, hw)  # a view for contiguous and channels_last inputs
    labels2 = labels.reshape(batch, hw)
    masked2 = masked.reshape(batch, hw).view(torch.uint8)
    cfg = _reduce_config(channels, groups, feats.dtype, features.device)
    target = cfg.pop("target")
    num_gblocks, num_cblocks = triton.cdiv(groups, cfg["BLOCK_G"]), triton.cdiv(channels, cfg["BLOCK_C"])
    splits, pix_per_split = num_splits(hw, cfg["BLOCK_N"], batch * num_gblocks * num_cblocks, target)
    dev = features.device
    if deterministic:
        part = torch.empty((batch, splits, groups, channels), dtype=torch.float32, device=dev)
        cpart = torch.empty((batch, splits, groups), dtype=torch.int32, device=dev)
        out_strides = (splits * groups * channels, groups * channels, splits * groups, groups)
    else:
        part = torch.zeros((batch, groups, channels), dtype=torch.float32, device=dev)
        cpart = torch.zeros((batch, groups), dtype=torch.int32, device=dev)
        out_strides = (groups * channels, 0, groups, 0)
    grid = (splits * num_gblocks, num_cblocks, batch)
    _classwise_reduce_fwd_kernel[grid](
        feats, labels2, masked2, part, cpart,
        channels, hw, num_classes, groups, pix_per_split, num_gblocks,
        feats.stride(0), feats.stride(1), feats.stride(2), labels2.stride(0), labels2.stride(1),
        masked2.stride(0), masked2.stride(1), *out_strides,
        DETERMINISTIC=deterministic, DOT_PRECISION=dot_precision(feats.dtype), **cfg,
    )
    if deterministic:
        sums = split_sum(part.view(batch, splits, groups * channels))
        counts = cpart.sum(1)  # integer sums are exact in any order
    else:
        sums, counts = part, cpart
    return (sums.view(batch, num_classes, 2, channels).to(out_dtype),
            counts.to(torch.int64).view(batch, num_classes, 2))


def _classwise_reduce_backward_triton(grad_sums, labels, masked, channels, dtype):
    batch, height, width = labels.shape
    hw, num_classes = height * width, grad_sums.shape[1]
    grad = torch.empty((batch, channels, height, width), dtype=dtype, device=labels.device)
    if grad.numel() == 0:
        return grad
    out = grad if kernel_dtype(grad) is grad else torch.empty_like(grad, dtype=torch.float32)
    gsum = grad_sums.float().contiguous()
    labels2, masked2 = labels.reshape(batch, hw), masked.reshape(batch, hw).view(torch.uint8)
    block_c = pow2(channels, cap=64)
    grid = (triton.cdiv(hw, _BLOCK_N), triton.cdiv(channels, block_c), batch)
    _classwise_reduce_bwd_kernel[grid](
        gsum, labels2, masked2, out, channels, hw, num_classes,
        labels2.stride(0), labels2.stride(1), masked2.stride(0), masked2.stride(1),
        BLOCK_N=_BLOCK_N, BLOCK_C=block_c, num_warps=8,  # 4 warps: 24 B spilled (fastseg bench --static)
    )
    return grad.copy_(out) if out is not grad else grad


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (CPU kernel: the reference, or Triton's interpreter inside run_triton_on_cpu();
# CUDA: Triton)
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
    return (features.new_empty((batch, num_classes, 2, channels), dtype=acc_dtype(features.dtype)),
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


def _classwise_reduce_setup_context(ctx, inputs, output):
    features, labels, masked = inputs[:3]
    ctx.save_for_backward(labels, masked)
    ctx.channels, ctx.dtype = features.shape[1], features.dtype
    # The backward runs outside the forward's run_triton_on_cpu() context: remember which path the forward took.
    ctx.triton_on_cpu = not features.is_cuda and use_triton(features)


def _classwise_reduce_backward(ctx, grad_sums, grad_counts):
    labels, masked = ctx.saved_tensors
    with run_triton_on_cpu(ctx.triton_on_cpu):
        grad = torch.ops.fastseg.classwise_reduce_backward(grad_sums, labels, masked, ctx.channels, ctx.dtype)
    return grad, None, None, None, None, None


_classwise_reduce_op.register_autograd(_classwise_reduce_backward, setup_context=_classwise_reduce_setup_context)


# fmt: on
# ----------------------------------------------------------------------------------------------------------------
# Functional entry
# ----------------------------------------------------------------------------------------------------------------
def classwise_reduce(
    features: torch.Tensor,
    labels: torch.Tensor,
    masked: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    deterministic: bool | None = None,
    impl: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    check_tensor("features", features, ndim=4, dtypes=_DTYPES, op=op)
    batch, _, height, width = features.shape
    check_groups(op, labels, masked, (batch, height, width), num_classes, ignore_index)
    check_same_device(op, features=features, labels=labels, masked=masked)
    if validate:
        check_label_values(op, labels, num_classes, ignore_index)
    det = resolve_deterministic(op, deterministic, features)
    mode = resolve_impl(impl, features)
    if mode == "torch":
        return classwise_reduce_ref(features, labels, masked, num_classes, ignore_index)
    with run_triton_on_cpu(mode == "interpret"):
        return torch.ops.fastseg.classwise_reduce(features, labels, masked, num_classes, ignore_index, det)
