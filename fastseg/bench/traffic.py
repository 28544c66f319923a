"""Memory-traffic model: how many bytes each op must move, how many the fused kernel moves, how many eager PyTorch
moves, and the roofline time those bytes cost on an H100, an H200 and a Jetson AGX Orin.

Per op at the static report's shipped shapes (`fastseg.bench.static.static_cases`):

(a) ``min_bytes``: every input read once and every output written once.
(b) ``kernel_bytes``: what the fused Triton kernels read and write by their tiling at the tiles the launcher picks
    on an H100 (from the static report's planned launches), re-reads included: e.g. a code tile read by every row
    block of ``vq_nearest``, the labels read by every (group block, channel block) program of ``classwise_reduce``.
    Re-reads of a tile that several programs share mostly hit L2, so (b) is the L2 -> SM traffic and an upper bound
    of the HBM traffic; (b) / (a) says how far the design is from the minimum.
(c) ``eager_bytes``: the bytes the reference (plain PyTorch) moves, measured: a ``TorchDispatchMode`` sums the
    input and output sizes of every aten op the reference runs (on ``meta`` tensors, so nothing is computed; views
    move nothing and are not counted). (c) / (b) bounds the speed-up fusion gives a memory-bound op.

The same (c) for a model's forward, eager (``impl="torch"``) against fused (``impl="auto"``: a fused op counts its
inputs and outputs once, as its fake kernel is dispatched on meta).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .roofline import DEVICE_PEAKS, DevicePeak

__all__ = ["AtenBytes", "eager_bytes", "op_traffic", "model_traffic", "format_traffic_table", "ROOFLINE_DEVICES"]


def _kernel_module(name: str) -> Any:
    """``fastseg.kernels.<name>`` the module: ``from fastseg.kernels import <name>`` gives the op's function."""
    import importlib

    return importlib.import_module(f"fastseg.kernels.{name}")


ROOFLINE_DEVICES = ("h100", "h200", "orin")


def _peak(key: str) -> DevicePeak:
    return dict(DEVICE_PEAKS)[key]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class AtenBytes(TorchDispatchMode):
    """Sums the bytes of every aten op's tensor inputs and outputs (views and metadata ops excluded)."""

    _FREE = {
        "view",
        "_unsafe_view",
        "reshape",
        "expand",
        "t",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "as_strided",
        "alias",
        "detach",
        "unbind",
        "split",
        "chunk",
        "narrow",
        "lift_fresh",
        "empty",
        "empty_like",
        "new_empty",
        "empty_strided",
        "_to_copy_noop",
        "view_as",
        "expand_as",
        "split_with_sizes",
        "diagonal",
        "sym_size",
        "sym_stride",
        "sym_numel",
    }

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in self._FREE:
            ins = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            moved = sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs)
            if name.endswith("_") or name in ("copy_",):  # in place: the output is the input written back
                moved = sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs[:1])
            self.bytes += moved
            self.ops[name] = self.ops.get(name, 0) + moved
        return out


def eager_bytes(fn: Callable[[], Any]) -> int:
    """Bytes moved by the aten ops ``fn`` runs (call it on meta tensors: nothing is computed)."""
    with AtenBytes() as mode:
        fn()
    return mode.bytes


# --------------------------------------------------------------------------------------------------------------------
# Per-op models: (a) minimum bytes, (b) bytes by the kernels' tiling, (c) the reference's aten traffic
# --------------------------------------------------------------------------------------------------------------------
def _m(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def _cfg(launches: list[dict], kernel: str) -> dict:
    for row in launches:
        if row["kernel"] == kernel:
            return {**row["config"], "grid": row["grid"]}
    raise KeyError(kernel)


def _vq(p: dict, es: int, dt: torch.dtype, launches: list[dict], backward: bool) -> tuple[float, float, Callable]:
    vq = _kernel_module("vq_nearest")  # the op's module (the package exports its function)

    n, k, d = p["n"], p["k"], p["d"]
    if backward:
        c = _cfg(launches, "_vq_nearest_bwd_kernel")
        d_blocks = math.ceil(d / c["BLOCK_D"])
        # reads grad, index per D block; z and the gathered code rows once; writes grad_z; fp32 atomics (read+write)
        kernel = d_blocks * n * (4 + 8) + 2 * n * d * es + n * d * es + 2 * n * d * 4 + k * d * 4 * 2
        minimum = n * (4 + 8) + n * d * es + k * d * es + n * d * es + k * d * es

        def eager() -> None:
            z, cb = _m(n, d, dtype=dt, grad=True), _m(k, d, dtype=dt, grad=True)
            vq._vq_nearest_backward_ref(_m(n, dtype=torch.float32), z, cb, _m(n, dtype=torch.int64))

        return minimum, kernel, eager
    c = _cfg(launches, "_vq_nearest_fwd_kernel")
    programs = math.ceil(n / c["BLOCK_N"])
    # z: NaN probe, centred tile, exact distance (3 reads); the winner's code row gathered; every program streams
    # all K centred codes and their norms.
    kernel = 3 * n * d * es + n * d * es + programs * k * (d * es + 4) + n * (8 + 4)
    minimum = n * d * es + k * d * es + n * (8 + 4)
    # The reference's loop-free form (its export decomposition): the chunked reference runs the same aten ops per
    # chunk but branches on data (`.item()`), which meta tensors cannot answer.
    return minimum, kernel, lambda: vq._vq_nearest_decomposition(_m(n, d, dtype=dt), _m(k, d, dtype=dt))


def _argmax(p: dict, es: int, dt: torch.dtype, launches: list[dict], backward: bool) -> tuple[float, float, Callable]:
    vq = _kernel_module("argmax_matmul")  # the op's module (the package exports its function)

    n, c_, k = p["n"], p["c"], p["k"]
    c = _cfg(launches, "_argmax_matmul_fwd_kernel")
    programs, k_tiles = math.ceil(n / c["BLOCK_N"]), math.ceil(k / c["BLOCK_K"])
    kernel = k_tiles * n * c_ * es + programs * k * (c_ * es + es) + n * 12  # x per class tile, W per row block
    minimum = n * c_ * es + k * c_ * es + k * es + n * 12
    return minimum, kernel, lambda: vq.argmax_matmul_ref(_m(n, c_, dtype=dt), _m(k, c_, dtype=dt), _m(k, dtype=dt))


def _pca(p: dict, es: int, dt: torch.dtype, launches: list[dict], backward: bool) -> tuple[float, float, Callable]:
    ca = _kernel_module("pixel_class_attention")  # the op's module (the package exports its function)

    b, h, n, k, d, mean = p["b"], p["h"], p["n"], p["k"], p["d"], p["mean"]
    qkv = b * h * (n + 2 * k) * d * es
    if backward:
        dq = _cfg(launches, "_pixel_class_attention_bwd_dq_kernel")
        dkdv = _cfg(launches, "_pixel_class_attention_bwd_dkdv_kernel")
        tiles = math.ceil(n / dq["BLOCK_N"])
        kv_blocks = dkdv["grid"][0]
        kernel = (
            b * h * n * d * es * 3  # dq kernel: q, dout read, dq written
            + tiles * b * h * 2 * k * d * es  # every pixel tile reads all of k and v
            + (b * k * n * es if mean else 0) * (1 + kv_blocks)  # dmean: dq kernel and every class block
            + b * h * n * 8 * (1 + kv_blocks)  # lse2, delta: written, then read per class block
            + kv_blocks * b * h * n * d * es * 2  # dkdv kernel: q, dout per class block
            + dkdv["grid"][2] * b * h * k * d * 4 * 2 * 2
        )  # fp32 partials written and summed
        minimum = (
            qkv + b * h * n * d * es + (b * k * n * es if mean else 0) + qkv
        )  # in: q k v dout dmean; out: dq dk dv

        def eager() -> None:
            q, kk, v = _m(b, h, n, d, dtype=dt), _m(b, h, k, d, dtype=dt), _m(b, h, k, d, dtype=dt)
            ca._pixel_class_attention_bwd_ref(
                _m(b, h, n, d, dtype=dt), _m(b, k, n, dtype=dt) if mean else None, q, kk, v, d**-0.5, True
            )

        return minimum, kernel, eager
    c = _cfg(launches, "_pixel_class_attention_fwd_kernel")
    tiles = math.ceil(n / c["BLOCK_N"])
    k_tiles = math.ceil(k / c["BLOCK_K"])
    kernel = b * h * n * d * es * 2 + tiles * b * h * 2 * k * d * es  # q read, out written, k v per pixel tile
    if mean:  # second pass: q per class tile, k per pixel tile; the mean written once
        kernel += k_tiles * b * h * n * d * es + tiles * b * h * k * d * es + b * k * n * es
    minimum = qkv + b * h * n * d * es + (b * k * n * es if mean else 0)

    def eager() -> None:
        q, kk, v = _m(b, h, n, d, dtype=dt), _m(b, h, k, d, dtype=dt), _m(b, h, k, d, dtype=dt)
        ca.pixel_class_attention_ref(q, kk, v, d**-0.5, negate=True, return_logits_mean=mean)

    return minimum, kernel, eager


def _mca(p: dict, es: int, dt: torch.dtype, launches: list[dict], backward: bool) -> tuple[float, float, Callable]:
    ca = _kernel_module("masked_class_attention")  # the op's module (the package exports its function)

    b, h, nq, n, d = p["b"], p["h"], p["nq"], p["n"], p["d"]
    mask = b * nq * n  # bool
    qo = b * h * nq * d * es
    kv = b * h * n * d * es * 2
    # rows of N % 16 bytes are first copied to 16-byte aligned rows (read the mask, write the padded copy)
    pad_copy = 0 if n % 16 == 0 else mask + b * nq * (-(-n // 16) * 16)
    if backward:
        c = _cfg(launches, "_masked_class_attention_bwd_kernel")
        q_blocks = math.ceil(nq / c["BLOCK_Q"])
        # dk/dv kernel: every pixel tile reads all queries, dout, lse, delta and its mask columns (per head);
        # dq kernel: every query block reads its k / v chunk and mask rows (per head), writes fp32 partials.
        tiles = math.ceil(n / c["BLOCK_N"])
        kernel = (
            tiles * b * h * (2 * nq * d * es + nq * 8)
            + kv
            + kv
            + h * mask
            + q_blocks * kv
            + h * mask
            + qo * 2
            + 2 * b * h * nq * d * 4
            + pad_copy
        )
        minimum = qo * 3 + kv * 2 + mask + b * h * nq * 4

        def eager() -> None:
            q, k, v = _m(b, h, nq, d, dtype=dt), _m(b, h, n, d, dtype=dt), _m(b, h, n, d, dtype=dt)
            out, lse = _m(b, h, nq, d, dtype=dt), _m(b, h, nq, dtype=torch.float32)
            ca._masked_class_attention_bwd_ref(out, None, q, k, v, _m(b, nq, n, dtype=torch.bool), out, lse, d**-0.5)

        return minimum, kernel, eager
    c = _cfg(launches, "_masked_class_attention_fwd_kernel")
    q_blocks, splits = math.ceil(nq / c["BLOCK_Q"]), c["grid"][2]
    partials = 0 if splits == 1 else 2 * splits * b * h * nq * (d + 2) * 4
    kernel = qo * splits + q_blocks * kv + h * mask + qo + b * h * nq * 4 + partials + pad_copy  # mask: per head
    minimum = qo * 2 + kv + mask + b * h * nq * 4

    def eager() -> None:
        q, k, v = _m(b, h, nq, d, dtype=dt), _m(b, h, n, d, dtype=dt), _m(b, h, n, d, dtype=dt)
        ca.masked_class_attention_ref(q, k, v, _m(b, nq, n, dtype=torch.bool), d**-0.5)

    return minimum, kernel, eager


def _reduce(p: dict, es: int, dt: torch.dtype, launches: list[dict], backward: bool) -> tuple[float, float, Callable]:
    cw = _kernel_module("classwise_reduce")  # the op's module (the package exports its function)

    b, ch, side, k = p["b"], p["c"], p["side"], p["k"]
    hw = side * side
    labels = b * hw * (8 + 1)  # int64 labels + bool mask
    sums = b * 2 * k * ch * 4
    if backward:
        c = _cfg(launches, "_classwise_reduce_bwd_kernel")
        c_blocks = math.ceil(ch / c["BLOCK_C"])
        kernel = c_blocks * labels + b * ch * hw * (es + 4)  # labels per channel block; gathered sums (L2), write
        minimum = labels + sums + b * ch * hw * es

        def eager() -> None:
            cw._classwise_reduce_backward_ref(
                _m(b, k, 2, ch, dtype=torch.float32),
                _m(b, side, side, dtype=torch.int64),
                _m(b, side, side, dtype=torch.bool),
                ch,
                dt,
            )

        return minimum, kernel, eager
    c = _cfg(launches, "_classwise_reduce_fwd_kernel")
    g_blocks = math.ceil(2 * k / c["BLOCK_G"])
    c_blocks = math.ceil(ch / c["BLOCK_C"])
    # Labels are read by every (group block, channel block) program; features about once (class maps are
    # spatially coherent: a tile rarely spans two group blocks); fp32 results flushed per split.
    splits = c["grid"][0] // max(g_blocks, 1)
    per_label_read = int(c.get("LABEL_READS", g_blocks * c_blocks))
    kernel = per_label_read * labels + b * ch * hw * es + splits * sums // max(g_blocks, 1) * 2
    minimum = labels + b * ch * hw * es + sums + b * 2 * k * 8

    def eager() -> None:
        cw.classwise_reduce_ref(
            _m(b, ch, side, side, dtype=dt),
            _m(b, side, side, dtype=torch.int64),
            _m(b, side, side, dtype=torch.bool),
            k,
            method="index_add",
        )

    return minimum, kernel, eager


def _recon(p: dict, es: int, dt: torch.dtype, launches: list[dict], backward: bool) -> tuple[float, float, Callable]:
    cw = _kernel_module("classwise_recon_loss")  # the op's module (the package exports its function)

    b, ch, side, k, patch = p["b"], p["c"], p["side"], p["k"], p["patch"]
    hw = side * side
    img = b * ch * hw * es
    labels = b * hw * 9
    if backward:
        kernel = 2 * img + labels + img + b * k * 4  # one program per patch: pred, target, labels, grad, weights
        minimum = kernel

        def eager() -> None:
            pred, target = _m(b, ch, side, side, dtype=dt), _m(b, ch, side, side, dtype=dt)
            cw._recon_loss_backward_ref(
                _m(b, k, dtype=torch.float32),
                pred,
                target,
                _m(b, side, side, dtype=torch.int64),
                _m(b, side, side, dtype=torch.bool),
                True,
                patch,
            )

        return minimum, kernel, eager
    kernel = 2 * img + labels + b * k * 8  # one pass; per-class partials
    minimum = kernel

    def eager() -> None:
        pred, target = _m(b, ch, side, side, dtype=dt), _m(b, ch, side, side, dtype=dt)
        cw.classwise_masked_recon_loss_ref(
            pred,
            target,
            _m(b, side, side, dtype=torch.int64),
            _m(b, side, side, dtype=torch.bool),
            k,
            normalize_target=True,
            patch_size=patch,
        )

    return minimum, kernel, eager


def _fusion(p: dict, es: int, dt: torch.dtype, launches: list[dict], backward: bool) -> tuple[float, float, Callable]:
    af = _kernel_module("attention_fusion")  # the op's module (the package exports its function)

    b, m, n, k = p["b"], p["m"], p["n"], p["k"]
    cols = n - k  # the patch columns: the class-token columns of attn are never read
    needed = b * m * n * cols * es  # the part of attn the op depends on
    grads = b * n * cols * es  # (cross, patch) together: (B, N, P)
    weights = b * m * es  # the static case passes weights in attn's dtype
    if backward:
        grad_attn = p["grad_attn"]
        c = _cfg(launches, "_attention_fusion_bwd_kernel")
        programs = c["grid"][0] * c["grid"][1] * c["grid"][2]
        tiles = c["grid"][0] * c["grid"][1]
        # one read of the gradient tile and of the needed attn; one fp32 partial per (map, tile), summed by torch
        # (read, fp32 sum written, cast to weights' dtype); with d attn: torch.zeros over all of attn's shape,
        # then the weight per (program, map) and the needed part written
        partials = b * m * tiles * 4 + b * m * 4 + (b * m * 4 + weights)
        kernel = grads + needed + b * m * tiles * 4 + partials
        minimum = grads + needed + weights  # in: G and the needed attn; out: d weights
        if grad_attn:
            kernel += b * m * n * n * es + programs * m * es + needed
            minimum += weights + b * m * n * n * es  # weights read; all of d attn written once (zeros included)

        def eager() -> None:
            af._attention_fusion_backward_ref(
                _m(b, k, cols, dtype=dt),
                _m(b, cols, cols, dtype=dt),
                _m(b, m, n, n, dtype=dt),
                _m(b, m, dtype=dt),
                k,
                grad_attn,
            )

        return minimum, kernel, eager
    c = _cfg(launches, "_attention_fusion_fwd_kernel")
    programs = c["grid"][0] * c["grid"][1] * c["grid"][2]
    # every needed attn element once; each program loads the image's M weights (scalars, L1 / L2 hits); the
    # (cross, patch) outputs written once
    kernel = needed + programs * m * es + grads
    minimum = needed + weights + grads
    return minimum, kernel, lambda: af.attention_fusion_ref(_m(b, m, n, n, dtype=dt), _m(b, m, dtype=dt), k)


def _pairs(p: dict, es: int, dt: torch.dtype, launches: list[dict], backward: bool) -> tuple[float, float, Callable]:
    cp = _kernel_module("cam_masked_pairs")  # the op's module (the package exports its function)

    b, ch, side, k, grid, pairs = p["b"], p["c"], p["side"], p["k"], p["grid"], p["pairs"]
    hw = side * side
    index = pairs * 8 * 2  # pair_image, pair_class (int64)
    pair_cams = pairs * grid * grid * es  # the positive pairs' CAMs, the only CAMs the op reads
    per_pair = pairs * ch * hw * es  # one (P, C, H, W) tensor
    images_read = min(b, pairs) * ch * hw * es  # at most P distinct images have a pair: only they are read
    # the min / max pass: every pair's CAM and indices, (min, max) written; the element kernels read the pair
    # indices, stats and the CAM again per program (a few hundred bytes each, L1 / L2 hits; counted once per pass)
    stats = index + pair_cams + pairs * 8
    again = index + pair_cams + pairs * 8
    images, cams = _m(b, ch, side, side, dtype=dt), _m(b, k, grid, grid, dtype=dt)
    pimg, pcls = _m(pairs, dtype=torch.int64), _m(pairs, dtype=torch.int64)
    if backward:
        grad_images = p["grad_images"]
        # Pass 1: X read per pair (pairs of one image are adjacent, so mostly an L2 hit), G_f and G_b once, dM (fp32)
        # and the per-tile partial sums written. Partials summed by torch (read, tiny writes). Pass 2: dM read, dU
        # written in place. Then the separable upsample transpose and the scatter into d cams, measured.
        tiles = _cfg(launches, "_cam_masked_pairs_bwd_kernel")["grid"][0]
        partials = pairs * tiles * 16
        pass1 = again + per_pair + 2 * per_pair + pairs * hw * 4 + partials
        pass2 = again + pairs * 12 + 2 * pairs * hw * 4
        transpose = eager_bytes(
            lambda: cp._upsample_transpose_to_cams(_m(pairs, side, side, dtype=torch.float32), cams, pimg, pcls)
        )
        kernel = stats + pass1 + partials + pass2 + transpose
        minimum = images_read + 2 * per_pair + index + pair_cams + b * k * grid * grid * es  # in; d cams out
        if grad_images:
            # per-pair d X written, then torch.zeros over the images and index_add_ (read the pairs', RMW images)
            kernel += per_pair + b * ch * hw * es + per_pair + 2 * b * ch * hw * es
            minimum += b * ch * hw * es

        def eager() -> None:
            cp._cam_masked_pairs_backward(
                _m(pairs, ch, side, side, dtype=dt),
                _m(pairs, ch, side, side, dtype=dt),
                images,
                cams,
                pimg,
                pcls,
                0.1,
                grad_images,
                fused=False,
            )

        return minimum, kernel, eager
    kernel = stats + again + per_pair + 2 * per_pair  # X read per pair; fg and bg written once
    minimum = images_read + index + pair_cams + 2 * per_pair
    return minimum, kernel, lambda: cp.cam_masked_pairs_ref(images, cams, pimg, pcls, 0.1)


_MODELS: dict[str, Callable] = {
    "vq_nearest": lambda *a: _vq(*a, backward=False),
    "vq_nearest_bwd": lambda *a: _vq(*a, backward=True),
    "argmax_matmul": lambda *a: _argmax(*a, backward=False),
    "pixel_class_attention": lambda *a: _pca(*a, backward=False),
    "pixel_class_attention_bwd": lambda *a: _pca(*a, backward=True),
    "masked_class_attention": lambda *a: _mca(*a, backward=False),
    "masked_class_attention_bwd": lambda *a: _mca(*a, backward=True),
    "classwise_reduce": lambda *a: _reduce(*a, backward=False),
    "classwise_reduce_bwd": lambda *a: _reduce(*a, backward=True),
    "classwise_masked_recon_loss": lambda *a: _recon(*a, backward=False),
    "classwise_masked_recon_loss_bwd": lambda *a: _recon(*a, backward=True),
    "attention_fusion": lambda *a: _fusion(*a, backward=False),
    "attention_fusion_bwd": lambda *a: _fusion(*a, backward=True),
    "cam_masked_pairs": lambda *a: _pairs(*a, backward=False),
    "cam_masked_pairs_bwd": lambda *a: _pairs(*a, backward=True),
}


def _roofline_ms(nbytes: float, flops: float, peak: DevicePeak, half: bool) -> float:
    rate = (peak.bf16_tflops if half else peak.fp32_tflops) * 1e12
    return max(nbytes / (peak.hbm_gbps * 1e9), flops / rate) * 1e3


def op_traffic(report: dict[str, Any], cases: list[Any], target: str = "sm_90") -> list[dict[str, Any]]:
    """(a), (b), (c) and roofline times per case of ``cases`` (`fastseg.bench.static.StaticCase`), in the half
    dtype the GPU benchmarks use (bf16; fp32 where the op takes fp32 only), at the tiles the launcher picks on
    ``target`` (read from the static ``report``)."""
    rows = []
    for case in cases:
        dtype = "bfloat16" if "bfloat16" in case.dtypes else case.dtypes[0]
        launches = [
            r
            for r in report["rows"]
            if r["case"] == case.name and r["dtype"] == dtype and r["target"] == target and "config" in r
        ]
        if not launches:
            continue
        dt = getattr(torch, dtype)
        es = torch.finfo(dt).bits // 8
        minimum, kernel, eager = _MODELS[case.op](case.launch.params, es, dt, launches)
        try:
            measured = eager_bytes(eager)
            note = ""
        except Exception as why:  # noqa: BLE001 - a reference that cannot run on meta is reported, not hidden
            measured, note = None, f"eager not measured: {type(why).__name__}: {str(why)[:80]}"
        row = {
            "op": case.op,
            "case": case.name,
            "dtype": dtype,
            "min_bytes": minimum,
            "kernel_bytes": kernel,
            "eager_bytes": measured,
            "kernel_over_min": kernel / minimum,
            "eager_over_kernel": measured / kernel if measured else None,
            "note": note,
        }
        for dev in ROOFLINE_DEVICES:
            row[f"roofline_ms_{dev}"] = _roofline_ms(minimum, 0.0, _peak(dev), dtype != "float32")
        rows.append(row)
    return rows


def model_traffic(names: list[str], image_size: int = 512, batch: int = 1) -> list[dict[str, Any]]:
    """Eager vs fused forward bytes of registered models on meta tensors (no weights are loaded or computed)."""
    import fastseg

    rows = []
    for name in names:
        row: dict[str, Any] = {"model": name, "image": image_size, "batch": batch}
        try:
            with torch.device("meta"):
                model = fastseg.create_model(name, num_classes=150).eval()
            x = torch.empty(batch, 3, image_size, image_size, device="meta")
            for impl in ("torch", "auto"):
                if hasattr(model, "set_impl"):
                    model.set_impl(impl)
                else:
                    for mod in model.modules():
                        if hasattr(mod, "impl"):
                            mod.impl = impl
                with torch.no_grad():
                    row[f"{'eager' if impl == 'torch' else 'fused'}_bytes"] = eager_bytes(functools.partial(model, x))
            row["eager_over_fused"] = row["eager_bytes"] / row["fused_bytes"]
        except Exception as why:  # noqa: BLE001 - reported in the table
            row["note"] = f"{type(why).__name__}: {str(why)[:100]}"
        for dev in ROOFLINE_DEVICES:
            if row.get("fused_bytes"):
                row[f"roofline_ms_{dev}"] = _roofline_ms(row["fused_bytes"], 0.0, _peak(dev), True)
        rows.append(row)
    return rows


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:,.1f}"


def format_traffic_table(rows: list[dict[str, Any]], models: list[dict[str, Any]] | None = None) -> str:
    head = (
        f"{'op [case]':58} {'dtype':8} {'(a) min MB':>11} {'(b) kernel MB':>13} {'(c) eager MB':>12} "
        f"{'b/a':>6} {'c/b':>6} | roofline of (a), ms: {'H100':>7} {'H200':>7} {'Orin':>7}"
    )
    lines = [
        "Traffic model: (a) inputs + outputs once, (b) fused kernels by their tiling (re-reads included, sm_90 "
        "tiles), (c) eager PyTorch, measured per aten op",
        head,
        "-" * len(head),
    ]
    for r in rows:
        ratio = "-" if r["eager_over_kernel"] is None else f"{r['eager_over_kernel']:.1f}"
        lines.append(
            f"{r['case'][:58]:58} {r['dtype']:8} {_mb(r['min_bytes']):>11} {_mb(r['kernel_bytes']):>13} "
            f"{_mb(r['eager_bytes']):>12} {r['kernel_over_min']:>6.2f} {ratio:>6} | {'':20} "
            f"{r['roofline_ms_h100']:>7.3f} {r['roofline_ms_h200']:>7.3f} {r['roofline_ms_orin']:>7.2f}"
            + (f"  {r['note']}" if r["note"] else "")
        )
    if models:
        lines += [
            "",
            f"{'model forward (meta, eager vs fused)':40} {'eager MB':>10} {'fused MB':>10} {'e/f':>6} | "
            f"roofline of fused, ms: H100 / H200 / Orin",
        ]
        for m in models:
            if "eager_bytes" not in m:
                lines.append(f"{m['model']:40} {m.get('note', '')}")
                continue
            lines.append(
                f"{m['model'] + ' ' + str(m['image']) + 'px':40} {_mb(m['eager_bytes']):>10} "
                f"{_mb(m['fused_bytes']):>10} {m['eager_over_fused']:>6.2f} | {m['roofline_ms_h100']:.3f} / "
                f"{m['roofline_ms_h200']:.3f} / {m['roofline_ms_orin']:.2f}"
            )
    return "\n".join(lines)
