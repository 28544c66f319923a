"""CAM-masked image pairs (SemPLeS): soft foreground / background images of the positive (image, class) pairs,
reading each image once and writing both outputs in one pass.

Inputs. ``images X (B, C, H, W)`` (the normalised, augmented training tensors), ``cams (B, K, h, w)`` (fine CAMs at
patch resolution), the P positive pairs ``(pair_image[p], pair_class[p])`` and ``delta > 0``. Forward, per pair
``p = (n, k)``::

    U_p  = bilinear_upsample(cams[n, k], size=(H, W), align_corners=True)
    M_p  = (U_p - min U_p) / (max U_p - min U_p + delta)            in [0, 1): a low-contrast CAM never reaches 1
    fg_p = M_p * X[n]          bg_p = (1 - M_p) * X[n]              (P, C, H, W) each

Only positive pairs are computed (upstream upsampled every class and discarded the negatives). Backward, with
``G_f, G_b`` the gradients of ``fg, bg``::

    dM_p[y, x]      = sum_c (G_f - G_b)[p, c, y, x] * X[n, c, y, x]
    d X[n]          = sum_{p of image n} M_p * G_f[p] + (1 - M_p) * G_b[p]      (only when X requires a gradient)
    dU_p            = dM_p / D + [U_p == min] * sum(dM_p (M_p - 1)) / (D |argmin|) - [U_p == max] * sum(dM_p M_p)
                      / (D |argmax|)          with D = max - min + delta  (ties split evenly, as torch.amin / amax)
    d cams[n, k]   += upsample_bilinear_transpose(dU_p)

Kernels. ``_cam_minmax_kernel`` (one program per pair) interpolates the CAM over the whole output grid from the
h x w map (a few KB, cached) and reduces its min / max: it reads no image data. ``_cam_masked_pairs_fwd_kernel``
(BLOCK pixels x one pair per program) interpolates, normalises, then walks the C channels reading ``X`` once and
writing ``fg`` and ``bg``. ``_cam_masked_pairs_bwd_kernel`` reads ``G_f``, ``G_b`` and ``X`` once to produce ``dM``
(fp32, P x H x W), the per-pair ``d X`` when asked, and per-tile partial sums of ``dM (M - 1)``, ``dM M`` and of the
extreme pixels' counts. ``_cam_mask_jacobian_kernel`` turns ``dM`` into ``dU`` in place (re-interpolating the CAM to
find the extreme pixels), and the upsample transpose is separable, ``R_y^T dU R_x``: two small matrix products that
read ``dU`` once. At the D.5b shapes the traffic model (``bench.traffic``) puts the backward at about 2x its minimum
bytes; with the mask Jacobian as PyTorch ops it was about 12x.

Ties: the extreme pixels are those whose interpolated value equals the min / max exactly, as computed by each
implementation. Where interpolation rounds (a near-constant CAM), Triton and PyTorch can find different tie sets;
both are valid subgradients, and the tests use exactly representable maps there.

Limits: images fp32 / fp16 / bf16 / fp64 (fp64 and, under the interpreter, bf16 run in fp32; outputs keep the
images' dtype), cams of any float dtype (interpolated in fp32), any strides; pair indices int64; int64 offsets.
Interpolation weights are computed in fp32 like PyTorch's CPU kernel, so the masks agree to about 1e-6. The
backward's two matrix products follow ``torch.set_float32_matmul_precision`` (TF32 under "high": d cams to ~1e-3).
This is a training op: no ONNX translation (``DECOMPOSITIONS`` is empty).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._utils import (
    FLOAT_DTYPES,
    acc_dtype,
    check_same_device,
    check_tensor,
    kernel_dtype,
    pow2,
    resolve_impl,
    run_triton_on_cpu,
    tl,
    triton,
    use_triton,
)

__all__ = ["DECOMPOSITIONS", "cam_masked_pairs", "cam_masked_pairs_ref", "cam_pair_masks_ref"]

DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {}  # training op: nothing to lower for ONNX

_FLOAT_DTYPES = (*FLOAT_DTYPES, torch.float64)  # fp64 runs the Triton path in fp32
_BLOCK = 256


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------
def cam_pair_masks_ref(
    cams: torch.Tensor, pair_image: torch.Tensor, pair_class: torch.Tensor, size: tuple[int, int], delta: float
) -> torch.Tensor:
    """``(P, 1, H, W)`` fp32 soft masks ``M_p`` of the pairs (upsample, then min-max normalise with ``delta``)."""
    cam = cams[pair_image, pair_class].to(acc_dtype(cams.dtype)).unsqueeze(1)
    up = F.interpolate(cam, size=size, mode="bilinear", align_corners=True)
    low = up.amin(dim=(2, 3), keepdim=True)
    high = up.amax(dim=(2, 3), keepdim=True)
    return (up - low) / (high - low + delta)


def cam_masked_pairs_ref(
    images: torch.Tensor, cams: torch.Tensor, pair_image: torch.Tensor, pair_class: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ``fg = M * X[n]``, ``bg = (1 - M) * X[n]`` for every pair (the oracle and the CPU path)."""
    mask = cam_pair_masks_ref(cams, pair_image, pair_class, tuple(images.shape[-2:]), delta)
    x = images[pair_image].to(acc_dtype(images.dtype))
    return (mask * x).to(images.dtype), ((1 - mask) * x).to(images.dtype)


def _mask_jacobian(
    grad_mask: torch.Tensor,
    cams: torch.Tensor,
    pair_image: torch.Tensor,
    pair_class: torch.Tensor,
    size: tuple[int, int],
    delta: float,
) -> torch.Tensor:
    """``d cams`` from ``d M (P, H, W)``: min-max Jacobian (ties split like amin / amax), then upsample transpose."""
    acc = acc_dtype(cams.dtype)
    cam = cams[pair_image, pair_class].to(acc).unsqueeze(1)
    up = F.interpolate(cam, size=size, mode="bilinear", align_corners=True)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    high = up.amax(dim=(1, 2), keepdim=True)
    denom = high - low + delta
    mask = (up - low) / denom
    g = grad_mask.to(acc)
    grad_low = (g * (mask - 1)).sum((1, 2), keepdim=True) / denom
    grad_high = -(g * mask).sum((1, 2), keepdim=True) / denom
    is_low, is_high = (up == low).float(), (up == high).float()
    grad_up = (
        g / denom
        + grad_low * is_low / is_low.sum((1, 2), keepdim=True)
        + grad_high * is_high / is_high.sum((1, 2), keepdim=True)
    )
    grad_cam = torch.ops.aten.upsample_bilinear2d_backward(grad_up.unsqueeze(1), list(size), list(cam.shape), True)
    grad_cams = torch.zeros(cams.shape, dtype=acc, device=cams.device)
    grad_cams.index_put_((pair_image, pair_class), grad_cam[:, 0], accumulate=True)
    return grad_cams.to(cams.dtype)


# Triton kernels and launchers keep their long argument lists compact.
# fmt: off
# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _upsampled_cam(cam_base, pix, pix_ok, W, h, w, scale_y, scale_x, s_ch, s_cw):
    """Bilinear (align_corners=True) value of the CAM at output pixels ``pix``, with PyTorch's weight order."""
    y = pix // W
    x = pix % W
    src_y = y.to(tl.float32) * scale_y
    src_x = x.to(tl.float32) * scale_x
    y0 = tl.minimum(src_y.to(tl.int32), h - 1)  # src >= 0, so truncation is floor
    x0 = tl.minimum(src_x.to(tl.int32), w - 1)
    y1 = tl.minimum(y0 + 1, h - 1)
    x1 = tl.minimum(x0 + 1, w - 1)
    ly = src_y - y0.to(tl.float32)
    lx = src_x - x0.to(tl.float32)
    c00 = tl.load(cam_base + y0 * s_ch + x0 * s_cw, mask=pix_ok, other=0.0).to(tl.float32)
    c01 = tl.load(cam_base + y0 * s_ch + x1 * s_cw, mask=pix_ok, other=0.0).to(tl.float32)
    c10 = tl.load(cam_base + y1 * s_ch + x0 * s_cw, mask=pix_ok, other=0.0).to(tl.float32)
    c11 = tl.load(cam_base + y1 * s_ch + x1 * s_cw, mask=pix_ok, other=0.0).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * c00 + lx * c01) + ly * ((1.0 - lx) * c10 + lx * c11)


@triton.jit
def _cam_minmax_kernel(cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, HW, W, h, w, scale_y, scale_x,
                       s_cb, s_ck, s_ch, s_cw, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    n = tl.load(pimg_ptr + p)
    k = tl.load(pcls_ptr + p)
    cam_base = cams_ptr + n * s_cb + k * s_ck
    low = tl.full((BLOCK,), float("inf"), tl.float32)
    high = tl.full((BLOCK,), float("-inf"), tl.float32)
    for start in range(0, HW, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        ok = pix < HW
        u = _upsampled_cam(cam_base, pix, ok, W, h, w, scale_y, scale_x, s_ch, s_cw)
        low = tl.minimum(low, tl.where(ok, u, float("inf")))
        high = tl.maximum(high, tl.where(ok, u, float("-inf")))
    tl.store(stats_ptr + 2 * p, tl.min(low, axis=0))
    tl.store(stats_ptr + 2 * p + 1, tl.max(high, axis=0))


@triton.jit
def _pair_mask(cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, p, pix, ok, W, h, w, scale_y, scale_x, delta,
               s_cb, s_ck, s_ch, s_cw):
    n = tl.load(pimg_ptr + p)
    k = tl.load(pcls_ptr + p)
    u = _upsampled_cam(cams_ptr + n * s_cb + k * s_ck, pix, ok, W, h, w, scale_y, scale_x, s_ch, s_cw)
    low = tl.load(stats_ptr + 2 * p)
    high = tl.load(stats_ptr + 2 * p + 1)
    # u is recomputed by the same inlined code as in the min / max pass, so the extremes compare equal exactly
    return n, (u - low) / (high - low + delta), u == low, u == high


@triton.jit
def _pair_tile(x_ptr, cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, C, HW, W, h, w, scale_y, scale_x, delta,
               s_xb, s_xh, s_xw, s_cb, s_ck, s_ch, s_cw, BLOCK: tl.constexpr):
    """Program prologue: this tile's pixels, their mask values, image pointers and (P, C, H, W) output offsets."""
    p = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pix < HW
    n, m, is_low, is_high = _pair_mask(cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, p, pix, ok, W, h, w, scale_y,
                                       scale_x, delta, s_cb, s_ck, s_ch, s_cw)
    x_ptrs = x_ptr + n * s_xb + (pix // W).to(tl.int64) * s_xh + (pix % W).to(tl.int64) * s_xw
    return p, pix, ok, m, is_low & ok, is_high & ok, x_ptrs, p * C * HW + pix.to(tl.int64)


@triton.jit
def _cam_masked_pairs_fwd_kernel(
    x_ptr, cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, fg_ptr, bg_ptr,
    C, HW, W, h, w, scale_y, scale_x, delta,
    s_xb, s_xc, s_xh, s_xw, s_cb, s_ck, s_ch, s_cw,
    BLOCK: tl.constexpr,
):
    _p, _pix, ok, m, _low, _high, x_ptrs, out_off = _pair_tile(x_ptr, cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, C,
                                                               HW, W, h, w, scale_y, scale_x, delta, s_xb, s_xh,
                                                               s_xw, s_cb, s_ck, s_ch, s_cw,
                                                               BLOCK)  # outputs are contiguous (P, C, H, W)
    for _c in range(0, C):
        x = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
        fg = m * x
        tl.store(fg_ptr + out_off, fg.to(fg_ptr.dtype.element_ty), mask=ok)
        tl.store(bg_ptr + out_off, (x - fg).to(bg_ptr.dtype.element_ty), mask=ok)
        x_ptrs += s_xc
        out_off += HW


@triton.jit
def _cam_masked_pairs_bwd_kernel(
    x_ptr, cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, gf_ptr, gb_ptr, gmask_ptr, partial_ptr, gx_ptr,
    C, HW, W, h, w, scale_y, scale_x, delta,
    s_xb, s_xc, s_xh, s_xw, s_cb, s_ck, s_ch, s_cw,
    NEED_GRAD_X: tl.constexpr, BLOCK: tl.constexpr,
):
    """dM of one tile of one pair, and the tile's partial sums for the min / max terms of the mask Jacobian:
    ``sum dM (M - 1)``, ``sum dM M``, and the number of pixels at the minimum and at the maximum."""
    p, pix, ok, m, is_low, is_high, x_ptrs, off = _pair_tile(x_ptr, cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, C, HW,
                                                             W, h, w, scale_y, scale_x, delta, s_xb, s_xh, s_xw,
                                                             s_cb, s_ck, s_ch, s_cw,
                                                             BLOCK)  # the gradients were made contiguous
    gmask = tl.zeros((BLOCK,), dtype=tl.float32)
    for _c in range(0, C):
        x = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
        gf = tl.load(gf_ptr + off, mask=ok, other=0.0).to(tl.float32)
        gb = tl.load(gb_ptr + off, mask=ok, other=0.0).to(tl.float32)
        gmask += (gf - gb) * x
        if NEED_GRAD_X:
            tl.store(gx_ptr + off, (m * gf + (1.0 - m) * gb).to(gx_ptr.dtype.element_ty), mask=ok)
        x_ptrs += s_xc
        off += HW
    tl.store(gmask_ptr + p * HW + pix.to(tl.int64), gmask, mask=ok)
    part = partial_ptr + (p * tl.num_programs(0) + tl.program_id(0)) * 4  # (P, tiles, 4), summed by the launcher
    tl.store(part, tl.sum(gmask * (m - 1.0), axis=0))  # masked pixels hold gmask = 0
    tl.store(part + 1, tl.sum(gmask * m, axis=0))
    tl.store(part + 2, tl.sum(is_low.to(tl.float32), axis=0))
    tl.store(part + 3, tl.sum(is_high.to(tl.float32), axis=0))


@triton.jit
def _cam_mask_jacobian_kernel(
    gmask_ptr, coef_ptr, cams_ptr, pimg_ptr, pcls_ptr, stats_ptr,
    HW, W, h, w, scale_y, scale_x, delta, s_cb, s_ck, s_ch, s_cw,
    BLOCK: tl.constexpr,
):
    """In place, dM -> dU = dM / D + a [U == min] + b [U == max], with the pair's (1 / D, a, b) in ``coef``."""
    p = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pix < HW
    _n, _m, is_low, is_high = _pair_mask(cams_ptr, pimg_ptr, pcls_ptr, stats_ptr, p, pix, ok, W, h, w, scale_y,
                                         scale_x, delta, s_cb, s_ck, s_ch, s_cw)
    inv_denom = tl.load(coef_ptr + 3 * p)
    a = tl.load(coef_ptr + 3 * p + 1)
    b = tl.load(coef_ptr + 3 * p + 2)
    ptrs = gmask_ptr + p * HW + pix.to(tl.int64)
    g = tl.load(ptrs, mask=ok, other=0.0) * inv_denom
    g += tl.where(is_low, a, 0.0) + tl.where(is_high, b, 0.0)
    tl.store(ptrs, g, mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def _align_corners_scale(src: int, dst: int) -> float:
    return (src - 1) / (dst - 1) if dst > 1 else 0.0


def _pair_stats(cams, pair_image, pair_class, size):
    height, width = size
    h, w = cams.shape[-2:]
    stats = torch.empty((pair_image.shape[0], 2), dtype=torch.float32, device=cams.device)
    block = pow2(height * width, cap=1024)
    _cam_minmax_kernel[(pair_image.shape[0],)](
        cams, pair_image, pair_class, stats, height * width, width, h, w,
        _align_corners_scale(h, height), _align_corners_scale(w, width), *cams.stride(), BLOCK=block,
    )
    return stats


def _cam_masked_pairs_triton(images, cams, pair_image, pair_class, delta):
    num_pairs = pair_image.shape[0]
    _, channels, height, width = images.shape
    fg = images.new_empty((num_pairs, channels, height, width))
    bg = images.new_empty((num_pairs, channels, height, width))
    if num_pairs * channels * height * width == 0:
        return fg, bg
    x = kernel_dtype(images)
    fg_k, bg_k = (fg, bg) if x.dtype == images.dtype else (torch.empty_like(fg, dtype=x.dtype),
                                                            torch.empty_like(bg, dtype=x.dtype))
    h, w = cams.shape[-2:]
    stats = _pair_stats(cams, pair_image, pair_class, (height, width))
    grid = (triton.cdiv(height * width, _BLOCK), num_pairs)
    _cam_masked_pairs_fwd_kernel[grid](
        x, cams, pair_image, pair_class, stats, fg_k, bg_k, channels, height * width, width, h, w,
        _align_corners_scale(h, height), _align_corners_scale(w, width), float(delta),
        *x.stride(), *cams.stride(), BLOCK=_BLOCK, num_warps=4,
    )
    if fg_k is not fg:
        fg.copy_(fg_k), bg.copy_(bg_k)
    return fg, bg


def _grad_mask_ref(grad_fg, grad_bg, images, cams, pair_image, pair_class, delta, need_grad_images):
    acc = acc_dtype(images.dtype)
    x = images[pair_image].to(acc)
    gf, gb = grad_fg.to(acc), grad_bg.to(acc)
    grad_mask = ((gf - gb) * x).sum(1)
    if not need_grad_images:
        return grad_mask, None
    mask = cam_pair_masks_ref(cams, pair_image, pair_class, tuple(images.shape[-2:]), delta)
    return grad_mask, mask * gf + (1 - mask) * gb


def _grad_mask_triton(grad_fg, grad_bg, images, cams, pair_image, pair_class, delta, need_grad_images):
    """dM (P, H, W) fp32, per-pair d X (or None), the pairs' (min, max) and the (P, tiles, 4) partial sums."""
    num_pairs, channels, height, width = grad_fg.shape
    x = kernel_dtype(images)
    gf, gb = grad_fg.contiguous(), grad_bg.contiguous()
    if gf.dtype != x.dtype:
        gf, gb = gf.to(x.dtype), gb.to(x.dtype)
    grad_mask = torch.empty((num_pairs, height, width), dtype=torch.float32, device=images.device)
    grad_pairs = torch.empty_like(gf) if need_grad_images else grad_mask
    h, w = cams.shape[-2:]
    stats = _pair_stats(cams, pair_image, pair_class, (height, width))
    grid = (triton.cdiv(height * width, _BLOCK), num_pairs)
    partials = torch.empty((num_pairs, grid[0], 4), dtype=torch.float32, device=images.device)
    _cam_masked_pairs_bwd_kernel[grid](
        x, cams, pair_image, pair_class, stats, gf, gb, grad_mask, partials, grad_pairs, channels, height * width,
        width, h, w, _align_corners_scale(h, height), _align_corners_scale(w, width), float(delta),
        *x.stride(), *cams.stride(), NEED_GRAD_X=need_grad_images, BLOCK=_BLOCK, num_warps=4,
    )
    return grad_mask, (grad_pairs if need_grad_images else None), stats, partials


def _interpolation_matrix(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """``(dst, src)`` fp32 weights of 1-D linear interpolation with align_corners=True (PyTorch's weight order):
    ``upsample(c) = R_y @ c @ R_x.T``, so its transpose is ``R_y.T @ g @ R_x``."""
    pos = torch.arange(dst, device=device, dtype=torch.float32) * _align_corners_scale(src, dst)
    lo = pos.to(torch.int64).clamp_max(src - 1)
    hi = (lo + 1).clamp_max(src - 1)
    frac = pos - lo
    rows = torch.arange(dst, device=device)
    weights = torch.zeros((dst, src), dtype=torch.float32, device=device)
    weights.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights


def _mask_jacobian_triton(grad_mask, stats, partials, cams, pair_image, pair_class, delta):
    """``d cams`` from the fused backward's dM and partial sums: the min / max terms applied in place by one kernel,
    then the (separable) upsample transpose as two small matrix products. Same semantics as `_mask_jacobian`."""
    num_pairs, height, width = grad_mask.shape
    h, w = cams.shape[-2:]
    sums = partials.sum(1)  # (P, 4): sum dM (M - 1), sum dM M, |argmin|, |argmax|
    inv_denom = 1.0 / (stats[:, 1] - stats[:, 0] + delta)
    # The extreme pixels are counted by the same inlined interpolation that found them, so each count is >= 1; the
    # clamp only keeps a would-be 0 / 0 finite.
    coef = torch.stack(
        (
            inv_denom,
            sums[:, 0] * inv_denom / sums[:, 2].clamp_min(1.0),
            -sums[:, 1] * inv_denom / sums[:, 3].clamp_min(1.0),
        ),
        dim=1,
    ).contiguous()
    grid = (triton.cdiv(height * width, _BLOCK), num_pairs)
    _cam_mask_jacobian_kernel[grid](
        grad_mask, coef, cams, pair_image, pair_class, stats, height * width, width, h, w,
        _align_corners_scale(h, height), _align_corners_scale(w, width), float(delta), *cams.stride(),
        BLOCK=_BLOCK, num_warps=4,
    )
    return _upsample_transpose_to_cams(grad_mask, cams, pair_image, pair_class)


def _upsample_transpose_to_cams(grad_up, cams, pair_image, pair_class):
    """``d cams`` from ``dU (P, H, W)`` fp32: the separable upsample transpose, summed into the pairs' CAMs."""
    _, height, width = grad_up.shape
    h, w = cams.shape[-2:]
    rows, cols = _interpolation_matrix(h, height, cams.device), _interpolation_matrix(w, width, cams.device)
    grad_cam = rows.t() @ (grad_up @ cols)  # (P, h, w): one read of dU, a (P, H, w) intermediate
    grad_cams = torch.zeros(cams.shape, dtype=torch.float32, device=cams.device)
    grad_cams.index_put_((pair_image, pair_class), grad_cam, accumulate=True)
    return grad_cams.to(cams.dtype)


def _cam_masked_pairs_backward(grad_fg, grad_bg, images, cams, pair_image, pair_class, delta, need_grad_images,
                               fused: bool):
    size = tuple(images.shape[-2:])
    if fused and pair_image.numel() and grad_fg.numel():
        grad_mask, grad_pairs, stats, partials = _grad_mask_triton(grad_fg, grad_bg, images, cams, pair_image,
                                                                   pair_class, delta, need_grad_images)
        grad_cams = _mask_jacobian_triton(grad_mask, stats, partials, cams, pair_image, pair_class, delta)
    else:
        grad_mask, grad_pairs = _grad_mask_ref(grad_fg, grad_bg, images, cams, pair_image, pair_class, delta,
                                               need_grad_images)
        grad_cams = _mask_jacobian(grad_mask, cams, pair_image, pair_class, size, delta)
    if not need_grad_images:
        return grad_cams, images.new_empty((0,))
    grad_images = torch.zeros(images.shape, dtype=grad_pairs.dtype, device=images.device)
    grad_images.index_add_(0, pair_image, grad_pairs)
    return grad_cams, grad_images.to(images.dtype)


# fmt: on
# ----------------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastseg::cam_masked_pairs", mutates_args=())
def _cam_masked_pairs_op(
    images: torch.Tensor, cams: torch.Tensor, pair_image: torch.Tensor, pair_class: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(images):
        return _cam_masked_pairs_triton(images, cams, pair_image, pair_class, delta)
    return cam_masked_pairs_ref(images, cams, pair_image, pair_class, delta)


@_cam_masked_pairs_op.register_fake
def _(images, cams, pair_image, pair_class, delta):
    shape = (pair_image.shape[0], *images.shape[1:])
    return images.new_empty(shape), images.new_empty(shape)


@torch.library.custom_op("fastseg::cam_masked_pairs_backward", mutates_args=())
def _cam_masked_pairs_backward_op(
    grad_fg: torch.Tensor,
    grad_bg: torch.Tensor,
    images: torch.Tensor,
    cams: torch.Tensor,
    pair_image: torch.Tensor,
    pair_class: torch.Tensor,
    delta: float,
    need_grad_images: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _cam_masked_pairs_backward(
        grad_fg, grad_bg, images, cams, pair_image, pair_class, delta, need_grad_images, fused=use_triton(images)
    )


@_cam_masked_pairs_backward_op.register_fake
def _(grad_fg, grad_bg, images, cams, pair_image, pair_class, delta, need_grad_images):
    return cams.new_empty(cams.shape), images.new_empty(images.shape if need_grad_images else (0,))


def _setup_context(ctx, inputs, output):
    images, cams, pair_image, pair_class, delta = inputs
    ctx.save_for_backward(images, cams, pair_image, pair_class)
    ctx.delta = delta


def _backward(ctx, grad_fg, grad_bg):
    images, cams, pair_image, pair_class = ctx.saved_tensors
    need_images = ctx.needs_input_grad[0]
    grad_cams, grad_images = torch.ops.fastseg.cam_masked_pairs_backward(
        grad_fg, grad_bg, images, cams, pair_image, pair_class, ctx.delta, need_images
    )
    return (grad_images if need_images else None), grad_cams, None, None, None


_cam_masked_pairs_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Functional entry
# ----------------------------------------------------------------------------------------------------------------
def cam_masked_pairs(
    images: torch.Tensor,
    cams: torch.Tensor,
    pair_image: torch.Tensor,
    pair_class: torch.Tensor,
    delta: float,
    impl: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft CAM-masked foreground / background images of the positive (image, class) pairs.

    Args:
        images: ``(B, C, H, W)`` float images (SemPLeS: the normalised, augmented training tensors); any strides.
        cams: ``(B, K, h, w)`` class activation maps at patch resolution (any float dtype).
        pair_image, pair_class: ``(P,)`` int64 image and class index of each positive pair.
        delta: the ``> 0`` term of the min-max denominator (SemPLeS: 0.1 in runs (a), (c); 1e-4 in run (b)).
        impl: ``"auto" | "triton" | "torch"`` (see ``fastseg.kernels._utils``).
        validate: check the pair indices against B and K (one host sync); skipped under ``torch.compile``.

    Returns:
        ``fg = M * X[n]`` and ``bg = (1 - M) * X[n]``, each ``(P, C, H, W)`` in the images' dtype. Gradients flow
        to ``cams`` (and to ``images`` when they require one).

    Raises:
        ValueError: wrong ranks / dtypes / devices, mismatched batch sizes, ``delta <= 0``, or a pair index out of
        range.
    """
    op = "cam_masked_pairs"
    check_tensor("images", images, ndim=4, dtypes=_FLOAT_DTYPES, op=op)
    check_tensor("cams", cams, ndim=4, dtypes=_FLOAT_DTYPES, op=op)
    check_tensor("pair_image", pair_image, ndim=1, dtypes=(torch.int64,), op=op)
    check_tensor("pair_class", pair_class, ndim=1, dtypes=(torch.int64,), op=op)
    if images.shape[0] != cams.shape[0]:
        raise ValueError(
            f"{op}: images {tuple(images.shape)} and cams {tuple(cams.shape)} must have the same batch size"
        )
    if pair_image.shape != pair_class.shape:
        raise ValueError(
            f"{op}: pair_image {tuple(pair_image.shape)} and pair_class {tuple(pair_class.shape)} must "
            f"have the same length P"
        )
    if min(cams.shape[-2:]) < 1 and pair_image.numel():
        raise ValueError(f"{op}: cams must have a non-empty spatial size, got {tuple(cams.shape)}")
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not delta > 0:
        raise ValueError(f"{op}: delta must be a number > 0 (SemPLeS uses 0.1 or 1e-4), got {delta!r}")
    check_same_device(op, images=images, cams=cams, pair_image=pair_image, pair_class=pair_class)
    if validate and pair_image.numel() and not torch.compiler.is_compiling():
        bad_n = (pair_image < 0) | (pair_image >= images.shape[0])
        bad_k = (pair_class < 0) | (pair_class >= cams.shape[1])
        if bool(bad_n.any()) or bool(bad_k.any()):
            raise ValueError(
                f"{op}: pair indices out of range: pair_image must lie in [0, {images.shape[0]}) and "
                f"pair_class in [0, {cams.shape[1]}), got pair_image {pair_image.tolist()} and "
                f"pair_class {pair_class.tolist()}"
            )
    mode = resolve_impl(impl, images)
    if mode == "torch":
        return cam_masked_pairs_ref(images, cams, pair_image, pair_class, float(delta))
    with run_triton_on_cpu(mode == "interpret"):
        return torch.ops.fastseg.cam_masked_pairs(images, cams, pair_image, pair_class, float(delta))
