"""Class-wise masked reconstruction loss in Triton: ``classwise_masked_recon_loss`` (S4MIM's class-wise MIM).

Groups as in `classwise_reduce`: pixel ``p`` of image ``b`` with label ``y_p`` in ``[0, K)`` (``ignore_index`` pixels
belong to no group). One pass over pred and target::

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

Kernels. ``_classwise_recon_loss_fwd_kernel`` / ``_classwise_recon_loss_bwd_kernel``: one program per (patch,
image) holds the patch's pixels as [patch^2] vectors and streams the channels (two passes for the target's mean and
variance, one for the error), so registers do not grow with C; it normalises the target and reduces squared errors per
class with a one-hot over the few class ids present in the patch (atomics in fast mode, per-patch partials summed in
a fixed order by `_utils.split_sum` in deterministic mode).

NaN / inf policy (the reference and the Triton kernel agree, gradients included): a non-finite ``pred`` or ``target``
value at a masked, labelled pixel makes its group's ``per_class`` entry and ``total`` non-finite, and its own gradient
non-finite; non-finite values at unmasked or ignored pixels are never selected (no effect on the loss, zero gradient
there). With ``normalize_target`` a non-finite target value poisons the normalised target of its whole patch (its
mean and variance), hence every masked, labelled pixel of that patch.

Limits: pred / target fp32 / fp16 / bf16 / fp64 (fp64 runs the Triton path in fp32); labels uint8 / int16 / int32 /
int64; ``num_classes`` up to 65536; Triton: at most 16 channels and ``patch_size`` at most 64 (the reference has no
such limit; ``impl="auto"`` falls back to it, ``impl="triton"`` raises ``ValueError``). A training op: no ONNX
translation (``DECOMPOSITIONS`` is empty).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._utils import (
    FLOAT_DTYPES,
    acc_dtype,
    check_groups,
    check_label_values,
    check_same_device,
    check_tensor,
    kernel_dtype,
    resolve_deterministic,
    resolve_impl,
    run_triton_on_cpu,
    split_sum,
    tl,
    triton,
    use_triton,
)

__all__ = ["DECOMPOSITIONS", "classwise_masked_recon_loss", "classwise_masked_recon_loss_ref", "normalize_patches_ref"]

# A training op: nothing to lower for ONNX, but the name is part of every op's contract.
DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {}

_DTYPES = (*FLOAT_DTYPES, torch.float64)
_MAX_CHANNELS = 16
_MAX_PATCH = 64
_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch: index_add_)
# ----------------------------------------------------------------------------------------------------------------
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


def classwise_masked_recon_loss_ref(
    pred: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    masked: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    normalize_target: bool = False,
    patch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `classwise_masked_recon_loss` (``index_add_``): ``(per_class (B, K), total ())``."""
    per_class, total, _ = _recon_loss_ref(pred, target, labels, masked, num_classes, normalize_target, patch_size)
    return per_class, total


def _recon_loss_ref(pred, target, labels, masked, num_classes, normalize_target, patch_size):
    batch, channels = pred.shape[:2]
    acc = acc_dtype(pred.dtype)
    target = target.detach().to(acc)
    if normalize_target:
        target = normalize_patches_ref(target, patch_size)
    labels = labels.long()
    valid = masked & (labels >= 0) & (labels < num_classes)
    # where() before squaring: unselected pixels get an exact zero gradient even where pred or target is NaN / inf
    err = torch.where(valid.unsqueeze(1), pred.to(acc) - target, 0.0).square().sum(1).reshape(-1)
    image = torch.arange(batch, device=labels.device).view(batch, 1, 1)
    index = torch.where(valid, image * num_classes + labels, batch * num_classes).reshape(-1)
    sums = err.new_zeros(batch * num_classes + 1).index_add_(0, index, err)[:-1].view(batch, num_classes)
    counts = torch.zeros(batch * num_classes + 1, dtype=torch.int64, device=labels.device)
    counts = counts.scatter_add_(0, index, torch.ones_like(index))[:-1].view(batch, num_classes)
    per_class = sums / (counts * channels).clamp(min=1).to(acc)  # absent groups: 0 / 1 = 0
    total = per_class.sum() / (counts > 0).sum().clamp(min=1).to(acc)
    return per_class, total, counts


def _recon_loss_backward_ref(weight, pred, target, labels, masked, normalize_target, patch_size):
    batch = pred.shape[0]
    num_classes = weight.shape[1]
    acc = acc_dtype(pred.dtype)
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


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
# The kernels and launchers keep their hand layout (one line per group of arguments): no formatter.
# fmt: off
@triton.jit
def _patch_pixels(
    labels_ptr,  # (B, H, W) integer labels, any strides
    masked_ptr,  # (B, H, W) uint8 view of the bool mask, any strides
    b, patch, patches_w, H, W, num_classes,
    stride_labelsb, stride_labelsh, stride_labelsw,
    stride_maskedb, stride_maskedh, stride_maskedw,
    PATCH: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The pixels of one patch as [BLOCK_P^2] vectors: row, column, in-bounds mask, and the class id (-1 for pixels
    outside the patch, unmasked or unlabelled)."""
    r = tl.arange(0, BLOCK_P * BLOCK_P)
    row = (patch // patches_w) * PATCH + r // BLOCK_P
    col = (patch % patches_w) * PATCH + r % BLOCK_P
    inside = (r // BLOCK_P < PATCH) & (r % BLOCK_P < PATCH) & (row < H) & (col < W)
    lab = tl.load(labels_ptr + b * stride_labelsb + row * stride_labelsh + col * stride_labelsw, mask=inside, other=0)
    msk = tl.load(masked_ptr + b * stride_maskedb + row * stride_maskedh + col * stride_maskedw, mask=inside, other=0)
    sel = inside & (msk != 0) & (lab >= 0) & (lab < num_classes)
    return row, col, inside, tl.where(sel, lab.to(tl.int32), -1)


@triton.jit
def _patch_stats(
    target_ptr,  # (B, C, H, W) any strides
    b, row, col, inside, C, eps,
    stride_targetb, stride_targetc, stride_targeth, stride_targetw,
    NORMALIZE: tl.constexpr,
):
    """Mean and 1 / std of the target over the patch's pixels and channels: two passes over the channels (the
    centred sum of squares does not cancel); (0, 1) without normalisation."""
    mean = 0.0
    rstd = 1.0
    if NORMALIZE:
        t_ptrs = target_ptr + b * stride_targetb + row * stride_targeth + col * stride_targetw
        acc = tl.zeros(row.shape, dtype=tl.float32)
        for _ in range(C):
            acc += tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32)
            t_ptrs += stride_targetc
        n = C * tl.sum(inside.to(tl.float32))
        mean = tl.sum(acc) / n
        t_ptrs = target_ptr + b * stride_targetb + row * stride_targeth + col * stride_targetw
        acc = tl.zeros(row.shape, dtype=tl.float32)
        for _ in range(C):
            centred = tl.where(inside, tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32) - mean, 0.0)
            acc += centred * centred
            t_ptrs += stride_targetc
        rstd = 1.0 / tl.sqrt(tl.sum(acc) / tl.maximum(n - 1.0, 1.0) + eps)
    return mean, rstd


@triton.jit
def _classwise_recon_loss_fwd_kernel(
    pred_ptr,  # (B, C, H, W) any strides
    target_ptr,  # (B, C, H, W) any strides
    labels_ptr, masked_ptr,  # as in _patch_pixels
    err_ptr,  # fp32 out: (B, K) zero-initialised (fast) or (B, PATCHES, K) zero-initialised partials (deterministic)
    cnt_ptr,  # int32 out, same layout as err_ptr
    C, H, W, num_classes, patches_w, eps,
    stride_errb, stride_errpatch,
    stride_predb, stride_predc, stride_predh, stride_predw,
    stride_targetb, stride_targetc, stride_targeth, stride_targetw,
    stride_labelsb, stride_labelsh, stride_labelsw,
    stride_maskedb, stride_maskedh, stride_maskedw,
    PATCH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    # One program per (patch, image); the channels are streamed (a [BLOCK_P^2] vector per channel), so registers do
    # not grow with C: at 16 channels x 64 x 64 the former whole-patch tile spilled 16-33 KB per thread.
    patch = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row, col, inside, k = _patch_pixels(
        labels_ptr, masked_ptr, b, patch, patches_w, H, W, num_classes,
        stride_labelsb, stride_labelsh, stride_labelsw, stride_maskedb, stride_maskedh, stride_maskedw,
        PATCH, BLOCK_P,
    )
    mean, rstd = _patch_stats(target_ptr, b, row, col, inside, C, eps,
                              stride_targetb, stride_targetc, stride_targeth, stride_targetw, NORMALIZE)
    err = tl.zeros(row.shape, dtype=tl.float32)
    x_ptrs = pred_ptr + b * stride_predb + row * stride_predh + col * stride_predw  # one channel per step
    t_ptrs = target_ptr + b * stride_targetb + row * stride_targeth + col * stride_targetw
    for _ in range(C):
        x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32)
        diff = tl.where(inside, x - (t - mean) * rstd, 0.0)
        err += diff * diff
        x_ptrs += stride_predc
        t_ptrs += stride_targetc
    base = b * stride_errb + patch * stride_errpatch
    # Only the class ids present in this patch: [k_lo, k_hi] (an empty range when no pixel is selected).
    k_lo = tl.min(tl.where(k >= 0, k, num_classes))
    k_hi = tl.max(k)
    for k0 in range(k_lo, k_hi + 1, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        onehot = k[:, None] == ks[None, :]
        e = tl.sum(tl.where(onehot, err[:, None], 0.0), axis=0)  # where, not a product: NaN stays in its group
        n = tl.sum(onehot.to(tl.int32), axis=0)
        if DETERMINISTIC:
            tl.store(err_ptr + base + ks, e, mask=ks < num_classes)
            tl.store(cnt_ptr + base + ks, n, mask=ks < num_classes)
        else:
            tl.atomic_add(err_ptr + base + ks, e, mask=n > 0)
            tl.atomic_add(cnt_ptr + base + ks, n, mask=n > 0)


@triton.jit
def _classwise_recon_loss_bwd_kernel(
    weight_ptr,  # (B, K) fp32 contiguous: d loss / d err of each group
    pred_ptr, target_ptr, labels_ptr, masked_ptr,  # as in the forward
    grad_ptr,  # (B, C, H, W) contiguous out
    C, H, W, num_classes, patches_w, eps,
    stride_predb, stride_predc, stride_predh, stride_predw,
    stride_targetb, stride_targetc, stride_targeth, stride_targetw,
    stride_labelsb, stride_labelsh, stride_labelsw,
    stride_maskedb, stride_maskedh, stride_maskedw,
    PATCH: tl.constexpr, BLOCK_P: tl.constexpr, NORMALIZE: tl.constexpr,
):
    patch = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row, col, inside, k = _patch_pixels(
        labels_ptr, masked_ptr, b, patch, patches_w, H, W, num_classes,
        stride_labelsb, stride_labelsh, stride_labelsw, stride_maskedb, stride_maskedh, stride_maskedw,
        PATCH, BLOCK_P,
    )
    mean, rstd = _patch_stats(target_ptr, b, row, col, inside, C, eps,
                              stride_targetb, stride_targetc, stride_targeth, stride_targetw, NORMALIZE)
    w = tl.load(weight_ptr + b * num_classes + k, mask=k >= 0, other=0.0)  # d loss / d err of the pixel's group
    x_ptrs = pred_ptr + b * stride_predb + row * stride_predh + col * stride_predw  # one channel per step
    t_ptrs = target_ptr + b * stride_targetb + row * stride_targeth + col * stride_targetw
    g_ptrs = grad_ptr + b * C * H * W + row * W + col
    for _ in range(C):
        x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptrs, mask=inside, other=0.0).to(tl.float32)
        # Unselected pixels get an exact 0 (a where, not 0 * (x - t), which is NaN where x or t is).
        g = tl.where(inside & (k >= 0), 2.0 * w * (x - (t - mean) * rstd), 0.0)
        tl.store(g_ptrs, g.to(grad_ptr.dtype.element_ty), mask=inside)
        x_ptrs += stride_predc
        t_ptrs += stride_targetc
        g_ptrs += H * W


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _tile(normalize_target: bool, patch_size: int) -> int:
    # Without normalisation the patch size plays no role and any tile works; 16 x 16 keeps registers modest.
    return patch_size if normalize_target else 16


def _warps(tile: int, backward: bool = False) -> int:
    # A 64 x 64 patch is 4096 pixels per [BLOCK_P^2] vector: 8 warps keep 16 per thread (the backward spilled 8 B
    # with 8 warps on sm_90 and is clean with 16; fastseg bench --static).
    if tile <= 32:
        return 4
    return 16 if backward else 8


def _class_tile(tile: int) -> int:
    # The per-class reduction materialises a [patch^2, BLOCK_K] one-hot: keep it at 8K elements (a 64 x 64 patch with
    # 16 classes per step spilled 1.9 KB per thread; fastseg bench --static).
    return max(2, min(16, 8192 // triton.next_power_of_2(tile) ** 2))


def _triton_supported(channels: int, normalize_target: bool, patch_size: int) -> bool:
    return channels <= _MAX_CHANNELS and _tile(normalize_target, patch_size) <= _MAX_PATCH


def _patch_strides(pred, target, labels, masked):
    return (*pred.stride(), *target.stride(), *labels.stride(), *masked.stride())


def _recon_loss_triton(pred, target, labels, masked, num_classes, normalize_target, patch_size, deterministic):
    batch, channels, height, width = pred.shape
    acc, dev = acc_dtype(pred.dtype), pred.device
    if pred.numel() == 0:
        counts = torch.zeros((batch, num_classes), dtype=torch.int64, device=dev)
        return counts.to(acc), torch.zeros((), dtype=acc, device=dev), counts
    pred32, target32 = kernel_dtype(pred), kernel_dtype(target)
    masked_u8 = masked.view(torch.uint8)
    tile = _tile(normalize_target, patch_size)
    cols = triton.cdiv(width, tile)
    num_patches = triton.cdiv(height, tile) * cols
    if deterministic:  # per-patch partials (zeros where a patch has no pixel of a class), fixed-order sum
        err = torch.zeros((batch, num_patches, num_classes), dtype=torch.float32, device=dev)
        cnt = torch.zeros((batch, num_patches, num_classes), dtype=torch.int32, device=dev)
        err_strides = (num_patches * num_classes, num_classes)
    else:
        err = torch.zeros((batch, num_classes), dtype=torch.float32, device=dev)
        cnt = torch.zeros((batch, num_classes), dtype=torch.int32, device=dev)
        err_strides = (num_classes, 0)
    _classwise_recon_loss_fwd_kernel[(num_patches, batch)](
        pred32, target32, labels, masked_u8, err, cnt,
        channels, height, width, num_classes, cols, _NORM_EPS, *err_strides,
        *_patch_strides(pred32, target32, labels, masked_u8),
        PATCH=tile, BLOCK_P=triton.next_power_of_2(tile), BLOCK_K=_class_tile(tile),
        NORMALIZE=normalize_target, DETERMINISTIC=deterministic, num_warps=_warps(tile),
    )
    if deterministic:
        sums = split_sum(err)
        counts = cnt.sum(1).to(torch.int64)
    else:
        sums, counts = err, cnt.to(torch.int64)
    per_class = sums.to(acc) / (counts * channels).clamp(min=1).to(acc)
    total = per_class.sum() / (counts > 0).sum().clamp(min=1).to(acc)
    return per_class, total, counts


def _recon_loss_backward_triton(weight, pred, target, labels, masked, normalize_target, patch_size):
    batch, channels, height, width = pred.shape
    grad = torch.empty((batch, channels, height, width), dtype=pred.dtype, device=pred.device)
    if grad.numel() == 0:
        return grad
    pred32, target32 = kernel_dtype(pred), kernel_dtype(target)
    out = grad if kernel_dtype(grad) is grad else torch.empty_like(grad, dtype=torch.float32)
    masked_u8 = masked.view(torch.uint8)
    tile = _tile(normalize_target, patch_size)
    cols = triton.cdiv(width, tile)
    _classwise_recon_loss_bwd_kernel[(triton.cdiv(height, tile) * cols, batch)](
        weight.float().contiguous(), pred32, target32, labels, masked_u8, out,
        channels, height, width, weight.shape[1], cols, _NORM_EPS,
        *_patch_strides(pred32, target32, labels, masked_u8),
        PATCH=tile, BLOCK_P=triton.next_power_of_2(tile),
        NORMALIZE=normalize_target, num_warps=_warps(tile, backward=True),
    )
    return grad.copy_(out) if out is not grad else grad


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (CPU kernel: the reference, or Triton's interpreter inside run_triton_on_cpu();
# CUDA: Triton)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastseg::classwise_masked_recon_loss", mutates_args=())
def _recon_loss_op(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor,
                   num_classes: int, ignore_index: int, normalize_target: bool, patch_size: int,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(pred) and _triton_supported(pred.shape[1], normalize_target, patch_size):
        return _recon_loss_triton(pred, target, labels, masked, num_classes, normalize_target, patch_size,
                                  deterministic)
    per_class, total, counts = _recon_loss_ref(pred, target, labels, masked, num_classes, normalize_target,
                                               patch_size)
    return per_class, total, counts


@_recon_loss_op.register_fake
def _(pred, target, labels, masked, num_classes, ignore_index, normalize_target, patch_size, deterministic):
    acc = acc_dtype(pred.dtype)
    return (pred.new_empty((pred.shape[0], num_classes), dtype=acc), pred.new_empty((), dtype=acc),
            labels.new_empty((pred.shape[0], num_classes), dtype=torch.int64))


@torch.library.custom_op("fastseg::classwise_masked_recon_loss_backward", mutates_args=())
def _recon_loss_backward_op(weight: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                            masked: torch.Tensor, normalize_target: bool, patch_size: int) -> torch.Tensor:
    if use_triton(pred) and _triton_supported(pred.shape[1], normalize_target, patch_size):
        return _recon_loss_backward_triton(weight, pred, target, labels, masked, normalize_target, patch_size)
    return _recon_loss_backward_ref(weight, pred, target, labels, masked, normalize_target, patch_size)


@_recon_loss_backward_op.register_fake
def _(weight, pred, target, labels, masked, normalize_target, patch_size):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _recon_loss_setup_context(ctx, inputs, output):
    pred, target, labels, masked = inputs[:4]
    ctx.save_for_backward(pred, target, labels, masked, output[2])
    ctx.normalize_target, ctx.patch_size = inputs[6], inputs[7]
    # The backward runs outside the forward's run_triton_on_cpu() context: remember which path the forward took.
    ctx.triton_on_cpu = not pred.is_cuda and use_triton(pred)


def _recon_loss_backward(ctx, grad_per_class, grad_total, grad_counts):
    pred, target, labels, masked, counts = ctx.saved_tensors
    present = counts > 0
    num_present = present.sum().clamp(min=1).to(grad_per_class.dtype)
    # d loss / d err[b, k]: per_class = err / (n C), total = sum(per_class) / #present
    weight = (grad_per_class + grad_total / num_present) / (counts * pred.shape[1]).clamp(min=1)
    weight = torch.where(present, weight, 0.0)
    with run_triton_on_cpu(ctx.triton_on_cpu):
        grad = torch.ops.fastseg.classwise_masked_recon_loss_backward(weight, pred, target, labels, masked,
                                                                      ctx.normalize_target, ctx.patch_size)
    return grad, None, None, None, None, None, None, None, None


_recon_loss_op.register_autograd(_recon_loss_backward, setup_context=_recon_loss_setup_context)


# fmt: on
# ----------------------------------------------------------------------------------------------------------------
# Functional entry
# ----------------------------------------------------------------------------------------------------------------
def classwise_masked_recon_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    masked: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    normalize_target: bool = False,
    patch_size: int = 16,
    deterministic: bool | None = None,
    impl: str = "auto",
    validate: bool = True,
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

    Raises:
        ValueError: wrong shapes / dtypes / devices, a label outside ``[0, K)`` that is not ``ignore_index``, a bad
        ``patch_size``, or ``impl="triton"`` beyond the kernel's limits.
    """
    op = "classwise_masked_recon_loss"
    check_tensor("pred", pred, ndim=4, dtypes=_DTYPES, op=op)
    check_tensor("target", target, ndim=4, dtypes=_DTYPES, op=op)
    if pred.shape != target.shape:
        raise ValueError(f"{op}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    batch, channels, height, width = pred.shape
    check_groups(op, labels, masked, (batch, height, width), num_classes, ignore_index)
    check_same_device(op, pred=pred, target=target, labels=labels, masked=masked)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    if validate:
        check_label_values(op, labels, num_classes, ignore_index)
    det = resolve_deterministic(op, deterministic, pred)
    target = target.detach()
    mode = resolve_impl(impl, pred)
    if mode == "torch":
        return classwise_masked_recon_loss_ref(
            pred, target, labels, masked, num_classes, ignore_index, normalize_target, patch_size
        )
    if impl == "triton" and not _triton_supported(channels, normalize_target, patch_size):
        raise ValueError(
            f"{op}: the Triton kernel takes at most {_MAX_CHANNELS} channels and patches of at "
            f"most {_MAX_PATCH} pixels, got C={channels}, patch_size={patch_size}; use impl='auto' "
            f"or 'torch'"
        )
    with run_triton_on_cpu(mode == "interpret"):
        per_class, total, _ = torch.ops.fastseg.classwise_masked_recon_loss(
            pred, target, labels, masked, num_classes, ignore_index, normalize_target, patch_size, det
        )
    return per_class, total
