"""Static GPU report: compile every Triton kernel for NVIDIA targets on any machine (no GPU needed).

For each *case* (an op at a shape users hit, in one dtype) the op's real launchers are called on ``meta`` tensors
inside `planning_target` with ``JITFunction.run`` replaced by a recorder. That yields exactly the kernels, grids,
constexprs and ``num_warps`` / ``num_stages`` the launcher picks on that GPU, with no copy of its tiling logic here.
Each recorded launch is then compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``;
``ptxas -v`` (run by Triton) gives registers and spills, Triton's metadata the shared memory, the PTX the
tensor-core instructions (``mma.sync`` / ``wgmma``), the TTIR the operand types of every ``tt.dot``. Occupancy is
computed from the per-architecture limits in `ARCHS`.

Results are cached in ``benchmarks/results/static/cache.json`` by a hash of the kernel's source (Triton's
``cache_key``: the function and every ``@triton.jit`` function it calls), the signature, constexprs, options, the
target and the Triton version: a changed kernel or config is recompiled, everything else is read back.

Run: ``fastseg bench --static [--full]`` or ``python -m fastseg.bench.static [--full]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHS",
    "ArchLimits",
    "StaticCase",
    "static_cases",
    "occupancy",
    "static_report",
    "format_static_table",
    "save_static_plot",
    "OCCUPANCY_FLOOR",
    "markdown_tables",
    "run_static",
    "problems",
]


def _kernel_module(name: str) -> Any:
    """``fastseg.kernels.<name>`` the module: ``from fastseg.kernels import <name>`` gives the op's function."""
    import importlib

    return importlib.import_module(f"fastseg.kernels.{name}")


REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / "benchmarks" / "results" / "static" / "cache.json"


# --------------------------------------------------------------------------------------------------------------------
# Per-architecture limits
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ArchLimits:
    name: str  # "sm_90"
    capability: tuple[int, int]
    device: str  # the part the SM count is taken from
    sm_count: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int  # bytes, the largest carve-out
    smem_per_block: int  # bytes, opt-in maximum for one block (dynamic shared memory)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    smem_alloc_unit: int = 128
    reserved_smem_per_block: int = 1024  # sm_80+: the driver reserves 1 KB of shared memory per block


# CUDA C++ Programming Guide, "Features and Technical Specifications", table "Technical Specifications per Compute
# Capability" (CUDA 12.x): max resident warps / blocks per SM, shared memory per SM (8.0: 164 KB, 8.6: 100 KB,
# 8.7: 164 KB, 8.9: 100 KB, 9.0: 228 KB) and per block (163 / 99 / 163 / 99 / 227 KB), 64K 32-bit registers per
# SM, 255 per thread; the 1 KB per-block reservation is cudaDevAttrReservedSharedMemoryPerBlock on sm_80+; the
# 256-register warp allocation unit is the CUDA Occupancy Calculator's. SM counts: A100 (108), A10 (72), Jetson AGX
# Orin (16, technical brief), L4 (58), H100 SXM5 (132) datasheets.
ARCHS: dict[str, ArchLimits] = {
    a.name: a
    for a in (
        ArchLimits("sm_80", (8, 0), "A100", 108, 64, 32, 164 * 1024, 163 * 1024),
        ArchLimits("sm_86", (8, 6), "A10 / RTX 30xx", 72, 48, 16, 100 * 1024, 99 * 1024),
        ArchLimits("sm_87", (8, 7), "Jetson AGX Orin", 16, 48, 16, 164 * 1024, 163 * 1024),
        ArchLimits("sm_89", (8, 9), "L4", 58, 48, 24, 100 * 1024, 99 * 1024),
        ArchLimits("sm_90", (9, 0), "H100 / H200", 132, 64, 32, 228 * 1024, 227 * 1024),
    )
}

# Lowest acceptable theoretical occupancy (active warps / max warps per SM) per kernel kind.
#  * "dot": tiled kernels whose loads are software-pipelined (num_stages) or that are compute-bound; like
#    FlashAttention / GEMMs they hide latency with instruction-level parallelism inside a big tile, so one block of
#    4 warps per SM (one warp per scheduler: 4 / 64 = 6.25 % on sm_80 / sm_90, 8.3 % on 48-warp parts) is enough.
#  * "stream": memory-bound streaming kernels (reductions, gathers, elementwise): Little's law on an H100 (3.35 TB/s
#    x ~0.6 us DRAM latency / 132 SMs ~ 15 KB in flight per SM) needs ~8 warps each with a few 16-byte loads per
#    thread in flight, i.e. 8 warps = 12.5 % of 64 (16.7 % of 48).
OCCUPANCY_FLOOR = {"dot": 4, "stream": 8}  # in active warps per SM


def occupancy(arch: ArchLimits, num_warps: int, regs: int, shared: int) -> dict[str, Any]:
    """Theoretical occupancy of a kernel on ``arch`` (the CUDA Occupancy Calculator's rules, no carve-out choice)."""
    threads = 32 * num_warps
    regs_per_warp = math.ceil(max(regs, 1) * 32 / arch.reg_alloc_unit) * arch.reg_alloc_unit
    by_regs = (arch.regs_per_sm // regs_per_warp) // num_warps if regs <= arch.max_regs_per_thread else 0
    block_smem = math.ceil((shared + arch.reserved_smem_per_block) / arch.smem_alloc_unit) * arch.smem_alloc_unit
    by_smem = arch.smem_per_sm // block_smem if shared <= arch.smem_per_block else 0
    by_warps = arch.max_warps_per_sm // num_warps
    blocks = min(by_regs, by_smem, by_warps, arch.max_blocks_per_sm)
    limiter = min(
        (("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps), ("blocks", arch.max_blocks_per_sm)),
        key=lambda kv: kv[1],
    )[0]
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy": blocks * num_warps / arch.max_warps_per_sm,
        "limiter": limiter,
        "threads_per_block": threads,
    }


# --------------------------------------------------------------------------------------------------------------------
# Cases: the launchers called on meta tensors
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StaticCase:
    op: str
    shape: str
    dtypes: tuple[str, ...]
    launch: Callable[[Any], None]  # launch(torch dtype): calls the op's launchers on meta tensors
    kind: str = "dot"  # occupancy floor class of its kernels ("dot" | "stream"); per kernel in KERNEL_KIND
    shipped: bool = True  # in the CI set (the shapes the methods use); the rest only under --full

    @property
    def name(self) -> str:
        return f"{self.op}[{self.shape}]"


# Kernels whose floor differs from their case's: the streaming helpers called by dot-based ops.
KERNEL_KIND = {
    "split_sum_kernel": "stream",
    "_masked_class_attention_combine_kernel": "stream",
    "_vq_nearest_bwd_kernel": "stream",
    "_classwise_reduce_bwd_kernel": "stream",
    "_classwise_recon_loss_fwd_kernel": "stream",
    "_classwise_recon_loss_bwd_kernel": "stream",
}

_ALL = ("float32", "float16", "bfloat16")


def _meta(*shape: int, dtype: Any) -> Any:
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _vq_fwd(n: int, k: int, d: int) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        vq = _kernel_module("vq_nearest")  # the op's module (the package exports its function)

        vq._vq_nearest_triton(_meta(n, d, dtype=dtype), _meta(k, d, dtype=dtype))

    launch.params = {"n": n, "k": k, "d": d}  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
    return launch


def _vq_bwd(n: int, k: int, d: int) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        import torch

        vq = _kernel_module("vq_nearest")  # the op's module (the package exports its function)

        grad, idx = _meta(n, dtype=torch.float32), _meta(n, dtype=torch.int64)
        vq._vq_nearest_backward_triton(grad, _meta(n, d, dtype=dtype), _meta(k, d, dtype=dtype), idx)

    launch.params = {"n": n, "k": k, "d": d}  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
    return launch


def _argmax(n: int, c: int, k: int) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        am = _kernel_module("argmax_matmul")  # the op's module (the package exports its function)

        am._argmax_matmul_triton(_meta(n, c, dtype=dtype), _meta(k, c, dtype=dtype), _meta(k, dtype=dtype))

    launch.params = {"n": n, "c": c, "k": k}  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
    return launch


def _pca(b: int, h: int, n: int, k: int, d: int, mean: bool, backward: bool) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        ca = _kernel_module("pixel_class_attention")  # the op's module (the package exports its function)

        q, kk, v = _meta(b, h, n, d, dtype=dtype), _meta(b, h, k, d, dtype=dtype), _meta(b, h, k, d, dtype=dtype)
        if backward:
            dmean = _meta(b, k, n, dtype=dtype) if mean else None
            ca._pixel_class_attention_bwd_triton(_meta(b, h, n, d, dtype=dtype), dmean, q, kk, v, d**-0.5, True)
        else:
            ca._pixel_class_attention_fwd_triton(q, kk, v, d**-0.5, True, mean)

    launch.params = {"b": b, "h": h, "n": n, "k": k, "d": d, "mean": mean, "backward": backward}  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
    return launch


def _mca(b: int, h: int, nq: int, n: int, d: int, backward: bool) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        import torch

        ca = _kernel_module("masked_class_attention")  # the op's module (the package exports its function)

        def heads(length: int) -> Any:  # (B, L, h * d) -> (B, h, L, d): the view MaskedCrossAttentionLayer passes
            return _meta(b, length, h * d, dtype=dtype).view(b, length, h, d).transpose(1, 2)

        q, k, v = heads(nq), heads(n), heads(n)
        mask = _meta(b, nq, n, dtype=torch.bool)
        if backward:
            out, lse = _meta(b, h, nq, d, dtype=dtype), _meta(b, h, nq, dtype=torch.float32)
            ca._masked_class_attention_bwd_triton(out, None, q, k, v, mask, out, lse, d**-0.5)
        else:
            ca._masked_class_attention_fwd_triton(q, k, v, mask, d**-0.5)

    launch.params = {"b": b, "h": h, "nq": nq, "n": n, "d": d, "backward": backward}  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
    return launch


def _reduce(b: int, c: int, side: int, k: int, deterministic: bool, backward: bool) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        import torch

        cw = _kernel_module("classwise_reduce")  # the op's module (the package exports its function)

        labels, masked = _meta(b, side, side, dtype=torch.int64), _meta(b, side, side, dtype=torch.bool)
        if backward:
            cw._classwise_reduce_backward_triton(_meta(b, k, 2, c, dtype=torch.float32), labels, masked, c, dtype)
        else:
            cw._classwise_reduce_triton(_meta(b, c, side, side, dtype=dtype), labels, masked, k, deterministic)

    launch.params = {"b": b, "c": c, "side": side, "k": k, "deterministic": deterministic, "backward": backward}  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
    return launch


def _recon(b: int, c: int, side: int, k: int, patch: int, backward: bool) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        import torch

        cw = _kernel_module("classwise_recon_loss")  # the op's module (the package exports its function)

        pred, target = _meta(b, c, side, side, dtype=dtype), _meta(b, c, side, side, dtype=dtype)
        labels, masked = _meta(b, side, side, dtype=torch.int64), _meta(b, side, side, dtype=torch.bool)
        if backward:
            weight = _meta(b, k, dtype=torch.float32)
            cw._recon_loss_backward_triton(weight, pred, target, labels, masked, True, patch)
        else:
            cw._recon_loss_triton(pred, target, labels, masked, k, True, patch, False)

    launch.params = {"b": b, "c": c, "side": side, "k": k, "patch": patch, "backward": backward}  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
    return launch


def _fusion(b: int, m: int, n: int, k: int, backward: bool, grad_attn: bool = False) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        af = _kernel_module("attention_fusion")  # the op's module (the package exports its function)

        attn, weights = _meta(b, m, n, n, dtype=dtype), _meta(b, m, dtype=dtype)
        if backward:
            gc, gp = _meta(b, k, n - k, dtype=dtype), _meta(b, n - k, n - k, dtype=dtype)
            af._attention_fusion_backward_triton(gc, gp, attn, weights, k, grad_attn)
        else:
            af._attention_fusion_triton(attn, weights, k)

    launch.params = {"b": b, "m": m, "n": n, "k": k, "backward": backward, "grad_attn": grad_attn}  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
    return launch


def _pairs(
    b: int, c: int, side: int, k: int, grid: int, pairs: int, backward: bool, grad_images: bool = False
) -> Callable[[Any], None]:
    def launch(dtype: Any) -> None:
        import torch

        cp = _kernel_module("cam_masked_pairs")  # the op's module (the package exports its function)

        images, cams = _meta(b, c, side, side, dtype=dtype), _meta(b, k, grid, grid, dtype=dtype)
        pimg, pcls = _meta(pairs, dtype=torch.int64), _meta(pairs, dtype=torch.int64)
        if backward:
            gf, gb = _meta(pairs, c, side, side, dtype=dtype), _meta(pairs, c, side, side, dtype=dtype)
            cp._cam_masked_pairs_backward(gf, gb, images, cams, pimg, pcls, 0.1, grad_images, fused=True)
        else:
            cp._cam_masked_pairs_triton(images, cams, pimg, pcls, 0.1)

    launch.params = {  # type: ignore[attr-defined]  # read by fastseg.bench.traffic
        "b": b,
        "c": c,
        "side": side,
        "k": k,
        "grid": grid,
        "pairs": pairs,
        "backward": backward,
        "grad_images": grad_images,
    }
    return launch


def _fwd_bwd(
    op: str,
    shape: str,
    build: Callable[[bool], Callable[[Any], None]],
    dtypes: tuple[str, ...] = _ALL,
    kinds: tuple[str, str] = ("dot", "dot"),
) -> tuple[StaticCase, StaticCase]:
    """An op's forward case and its backward (``op + "_bwd"``) at one shape; ``build(backward)`` makes the launch."""
    return (
        StaticCase(op, shape, dtypes, build(False), kind=kinds[0]),
        StaticCase(f"{op}_bwd", shape, dtypes, build(True), kind=kinds[1]),
    )


def static_cases(full: bool = False) -> list[StaticCase]:
    """The shipped cases (the spec shapes of each method) and, with ``full``, a sweep around them."""
    stream = ("stream", "stream")
    cases = [
        # GSS: tokenizer quantisation (D=256, K=1024 / 8192, N = 8 x 64 x 64), palette inverse (D=3, K=150).
        StaticCase("vq_nearest", "N32768-K1024-D256", _ALL, _vq_fwd(32768, 1024, 256)),
        StaticCase("vq_nearest", "N32768-K8192-D256", _ALL, _vq_fwd(32768, 8192, 256)),
        StaticCase("vq_nearest", "N1048576-K150-D3", ("float32",), _vq_fwd(1 << 20, 150, 3)),
        StaticCase("vq_nearest_bwd", "N32768-K1024-D256", _ALL, _vq_bwd(32768, 1024, 256), kind="stream"),
        # GSS token head: 1x1 conv 2048 -> 8192 logits, arg-maxed, at 128 x 128.
        StaticCase("argmax_matmul", "N16384-C2048-K8192", _ALL, _argmax(16384, 2048, 8192)),
        # ECENet: 150 classes, 4 heads of d=64, pixels at stride 8 of 512 x 512 (the head-mean mode is the model's).
        *_fwd_bwd(
            "pixel_class_attention", "B8-h4-N4096-K150-d64-mean", lambda bwd: _pca(8, 4, 4096, 150, 64, True, bwd)
        ),
        StaticCase("pixel_class_attention", "B8-h4-N4096-K150-d64", _ALL, _pca(8, 4, 4096, 150, 64, False, False)),
        # Mask2Former: 100 queries, 8 heads of d=32, pixels at stride 8.
        *_fwd_bwd("masked_class_attention", "B8-h8-Q100-N4096-d32", lambda bwd: _mca(8, 8, 100, 4096, 32, bwd)),
        # Mask2Former as PADing's segmenter (spec C.2, COCO panoptic: B = 12, 928 x 928 crops): the decoder's masked
        # cross-attention at the 1/32, 1/16 and 1/8 levels (29^2, 58^2, 116^2 pixels).
        *(
            case
            for n in (841, 3364, 13456)
            for case in _fwd_bwd(
                "masked_class_attention", f"B12-h8-Q100-N{n}-d32", lambda bwd, n=n: _mca(12, 8, 100, n, 32, bwd)
            )
        ),
        # The registered CPU-sized Mask2Former (16 queries, 4 heads of d=16) on the 64 x 64 shapes world, 1/8 level.
        *_fwd_bwd("masked_class_attention", "B8-h4-Q16-N64-d16", lambda bwd: _mca(8, 4, 16, 64, 16, bwd)),
        # S4MIM / SemPLeS: class-wise sums of 256-channel features at 512 x 512, 150 classes.
        *_fwd_bwd(
            "classwise_reduce",
            "B8-C256-512x512-K150",
            lambda bwd: _reduce(8, 256, 512, 150, False, bwd),
            kinds=("dot", "stream"),
        ),
        StaticCase("classwise_reduce", "B8-C256-512x512-K150-det", _ALL, _reduce(8, 256, 512, 150, True, False)),
        # S4MIM pixel reconstruction: RGB, 16 x 16 normalised patches; and the documented limit of the Triton recon
        # loss (16 channels, 64 x 64 patches).
        *_fwd_bwd(
            "classwise_masked_recon_loss",
            "B8-C3-512x512-K150-p16",
            lambda bwd: _recon(8, 3, 512, 150, 16, bwd),
            ("float32",),
            stream,
        ),
        *_fwd_bwd(
            "classwise_masked_recon_loss",
            "B2-C16-512x512-K150-p64",
            lambda bwd: _recon(2, 16, 512, 150, 64, bwd),
            ("float32",),
            stream,
        ),
        # SemPLeS / WeakTr (spec D.5b, VOC stage c, B = 64): AAF over the 12 x 6 = 72 DeiT-S maps of 20 class tokens
        # + 196 patches; the maps reach AAF detached, so its backward computes d weights only (d attn: API option).
        *_fwd_bwd("attention_fusion", "B64-M72-N216-K20", lambda bwd: _fusion(64, 72, 216, 20, bwd), kinds=stream),
        StaticCase(
            "attention_fusion_bwd", "B64-M72-N216-K20-grad-attn", _ALL, _fusion(64, 72, 216, 20, True, True), "stream"
        ),
        # SemPLeS masked pairs (spec D.5b / D.9): X (64, 3, 224, 224), fine CAMs (64, 20, 14, 14), P = 96 positive
        # pairs; images need no gradient in SemPLeS (d images: API option).
        *_fwd_bwd(
            "cam_masked_pairs",
            "B64-C3-224x224-K20-cam14-P96",
            lambda bwd: _pairs(64, 3, 224, 20, 14, 96, bwd, False),
            kinds=stream,
        ),
        StaticCase(
            "cam_masked_pairs_bwd",
            "B64-C3-224x224-K20-cam14-P96-grad-images",
            _ALL,
            _pairs(64, 3, 224, 20, 14, 96, True, True),
            "stream",
        ),
    ]
    if full:
        extra = [
            StaticCase("vq_nearest", "N32768-K1024-D64", _ALL, _vq_fwd(32768, 1024, 64)),
            StaticCase("vq_nearest", "N32768-K1024-D512", _ALL, _vq_fwd(32768, 1024, 512)),
            StaticCase("argmax_matmul", "N4096-C256-K1024", _ALL, _argmax(4096, 256, 1024)),
            *(
                case
                for d in (32, 128)
                for k in (19, 256)
                for case in _fwd_bwd(
                    "pixel_class_attention",
                    f"B8-h4-N4096-K{k}-d{d}-mean",
                    lambda bwd, k=k, d=d: _pca(8, 4, 4096, k, d, True, bwd),
                )
            ),
            *(
                case
                for d in (64, 128)
                for case in _fwd_bwd(
                    "masked_class_attention", f"B8-h8-Q100-N4096-d{d}", lambda bwd, d=d: _mca(8, 8, 100, 4096, d, bwd)
                )
            ),
            StaticCase("classwise_reduce", "B8-C64-128x128-K21", _ALL, _reduce(8, 64, 128, 21, False, False)),
        ]
        cases += [dataclasses.replace(c, shipped=False) for c in extra]
    return cases


# --------------------------------------------------------------------------------------------------------------------
# Planning (record launches) and compiling: run in subprocesses where TRITON_INTERPRET is off
# --------------------------------------------------------------------------------------------------------------------
def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _record(case: StaticCase, dtype: str, arch: ArchLimits) -> list[tuple[Any, tuple, dict, Any]]:
    from triton.runtime.jit import JITFunction

    from fastseg.kernels._utils import GpuTarget, planning_target

    launches: list[tuple[Any, tuple, dict, Any]] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):  # noqa: ANN001 - Triton's signature
        launches.append((self, args, dict(kwargs), grid))

    JITFunction.run = record
    try:
        with planning_target(GpuTarget(arch.capability, arch.sm_count, arch.smem_per_block)):
            case.launch(_torch_dtype(dtype))
    finally:
        JITFunction.run = original
    return launches


class _Pointer:
    """Stands in for a tensor argument: Triton only reads its dtype and address (16-byte aligned, as the caching
    allocator's blocks are)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _plan_one(case: StaticCase, dtype: str, arch: ArchLimits) -> list[dict[str, Any]]:
    """Every launch of ``case`` on ``arch`` as a compile job (module, kernel, signature, constexprs, ...)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch.capability[0] * 10 + arch.capability[1], 32)
    backend = make_backend(target)
    jobs = []
    for fn, args, kwargs, grid in _record(case, dtype, arch):
        args = tuple(_Pointer(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        job = {
            "module": fn.fn.__module__,
            "kernel": fn.fn.__name__,
            "signature": signature,
            "constexprs": [[list(k), _jsonable(v)] for k, v in constexprs.items()],
            "attrs": [[list(k), _jsonable(v)] for k, v in attrs.items()],
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
            "grid": list(grid) if not callable(grid) else None,
            "target": arch.name,
        }
        config = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        job["config"] = _jsonable(config)
        payload = json.dumps(
            {k: job[k] for k in ("signature", "constexprs", "attrs", "num_warps", "num_stages", "target")},
            sort_keys=True,
        )
        job["key"] = hashlib.sha256(f"{fn.cache_key}|{payload}|{triton.__version__}".encode()).hexdigest()[:24]
        jobs.append(job)
    return jobs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_DOT = re.compile(r"tt\.dot\b[^\n]*?:\s*tensor<[0-9x]+x(\w+)(?:,[^>]*)?>\s*\*\s*tensor<[0-9x]+x(\w+)")


def _compile_one(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one planned launch; the measured properties, or the compile error."""
    import contextlib
    import importlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = ARCHS[job["target"]]
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    constexprs = {tuple(k): v for k, v in job["constexprs"]}
    attrs = {tuple(k): v for k, v in job["attrs"]}
    target = GPUTarget("cuda", arch.capability[0] * 10 + arch.capability[1], 32)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    result: dict[str, Any] = {"ok": False}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, job["signature"], constexprs, attrs),
                target=target,
                options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
            )
    except Exception as why:  # noqa: BLE001 - any compile failure is a finding to report
        message = str(why).strip()
        lines = [ln for ln in message.splitlines() if ln.strip()]
        # Triton's CompilationError shows the source first and the reason on the last line.
        result["error"] = (lines[-1] if lines else type(why).__name__)[:400]
        result["error_detail"] = message[-1500:]
        return result
    text = log.getvalue()
    regs = [int(m) for m in _PTXAS_REGS.findall(text)]
    spills = [tuple(map(int, m)) for m in _PTXAS_SPILL.findall(text)]
    ptx = compiled.asm.get("ptx", "")
    ttir = compiled.asm.get("ttir", "")
    dots = _DOT.findall(ttir)
    result.update(
        ok=True,
        regs=max(regs) if regs else None,
        stack=max((s[0] for s in spills), default=0),
        spill_stores=max((s[1] for s in spills), default=0),
        spill_loads=max((s[2] for s in spills), default=0),
        shared=int(compiled.metadata.shared),
        mma_sync=len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
        wgmma=len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
        fma=len(re.findall(r"^\s*fma\.rn\.f32", ptx, re.M)),
        dot_operands=sorted({f"{a}x{b}" for a, b in dots}),
        ptxas_log=text.strip()[-600:],
    )
    return result


def _worker_main(argv: Sequence[str]) -> int:
    """Subprocess entry: ``plan`` or ``compile``; JSON in on stdin, JSON out on stdout."""
    request = json.load(sys.stdin)
    if argv[0] == "plan":
        cases = {c.name: c for c in static_cases(full=True)}
        out = []
        for item in request:
            case, arch = cases[item["case"]], ARCHS[item["target"]]
            try:
                jobs = _plan_one(case, item["dtype"], arch)
                out.append({**item, "jobs": jobs})
            except Exception as why:  # noqa: BLE001 - a launcher refusing the inputs is a finding
                out.append({**item, "jobs": [], "plan_error": f"{type(why).__name__}: {why}"[:400]})
    else:
        out = {}
        partial = request["partial"]
        for job in request["jobs"]:
            out[job["key"]] = _compile_one(job)
            if partial:  # one line per kernel as it finishes: an interrupted run keeps what it compiled
                with open(partial, "a") as f:
                    f.write(json.dumps({job["key"]: out[job["key"]]}) + "\n")
    sys.stdout.write("\n@@RESULT@@" + json.dumps(out))
    return 0


def _run_worker(mode: str, request: Any) -> Any:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the kernels must be real JITFunctions, not interpreted ones
    env["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas must run (its log gives registers and spills)
    with tempfile.TemporaryDirectory(prefix="fastseg-static-") as triton_cache:
        env["TRITON_CACHE_DIR"] = triton_cache  # Triton's own cache: private, and removed afterwards
        proc = subprocess.run(
            [sys.executable, "-m", "fastseg.bench.static", "--worker", mode],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
        raise RuntimeError(f"static {mode} worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1])


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    for partial in sorted(path.parent.glob(path.stem + ".partial-*.jsonl")):  # left by an interrupted run
        for line in partial.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                cache.update(json.loads(line))
    return cache


def _save_cache(path: Path, cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache


def static_report(
    full: bool = False,
    targets: Iterable[str] | None = None,
    ops: Iterable[str] | None = None,
    cache_path: Path | None = DEFAULT_CACHE,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plan and compile every case for every target; ``{"rows": [...], "targets": ..., "triton": ...}``.

    ``cache_path=None`` disables the cache. ``workers`` compile processes (default: min(4, CPUs)).
    """
    from concurrent.futures import ThreadPoolExecutor

    import triton

    targets = list(targets or ARCHS)
    unknown = [t for t in targets if t not in ARCHS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; known: {list(ARCHS)}")
    cases = [c for c in static_cases(full) if ops is None or c.op in set(ops)]
    requests = [{"case": c.name, "dtype": dt, "target": t} for c in cases for dt in c.dtypes for t in targets]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    say = progress or (lambda _msg: None)
    say(f"planning {len(requests)} (case, dtype, target) launches")
    chunks = [requests[i::workers] for i in range(workers) if requests[i::workers]]
    with ThreadPoolExecutor(len(chunks)) as pool:
        planned = [p for part in pool.map(lambda ch: _run_worker("plan", ch), chunks) for p in part]
    cache = _load_cache(cache_path) if cache_path else {}
    todo: dict[str, dict] = {}
    for item in planned:
        for job in item["jobs"]:
            if job["key"] not in cache:
                todo[job["key"]] = job
    say(
        f"compiling {len(todo)} kernels ({sum(len(p['jobs']) for p in planned) - len(todo)} cached) "
        f"in {workers} processes"
    )
    if todo:
        owner = {j["key"]: p["case"] for p in planned for j in p["jobs"]}
        jobs = sorted(todo.values(), key=lambda j: j["key"])
        chunks = [jobs[i::workers] for i in range(workers) if jobs[i::workers]]
        partials = [
            cache_path.parent / f"{cache_path.stem}.partial-{os.getpid()}-{i}.jsonl" if cache_path else None
            for i in range(len(chunks))
        ]
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(len(chunks)) as pool:
            requests_ = [{"jobs": ch, "partial": str(pp) if pp else None} for ch, pp in zip(chunks, partials)]
            for part in pool.map(lambda rq: _run_worker("compile", rq), requests_):
                cache.update({k: {**v, "case": owner[k]} for k, v in part.items()})
        if cache_path:
            live = {j["key"] for p in planned for j in p["jobs"]}
            on_disk = _load_cache(cache_path)  # what other runs saved meanwhile
            merged = {**on_disk, **cache}
            # Keep the entries of cases this run did not plan (e.g. the --full sweep's); drop stale ones of the
            # cases it did plan (their kernel or config changed), so the committed cache does not grow forever.
            planned_cases = {p["case"] for p in planned}
            live |= {k for k, v in on_disk.items() if v.get("case") and v["case"] not in planned_cases}
            _save_cache(cache_path, {k: v for k, v in merged.items() if k in live})
            for old in cache_path.parent.glob(cache_path.stem + ".partial-*.jsonl"):
                old.unlink()
    kinds = {c.name: c.kind for c in cases}
    shipped = {c.name: c.shipped for c in cases}
    rows = []
    for item in planned:
        base = {
            "op": item["case"].split("[")[0],
            "case": item["case"],
            "dtype": item["dtype"],
            "target": item["target"],
            "shipped": shipped[item["case"]],
        }
        if "plan_error" in item:
            rows.append({**base, "kernel": "(launcher)", "ok": False, "error": item["plan_error"]})
            continue
        for job in item["jobs"]:
            res = cache[job["key"]]
            row = {
                **base,
                "kernel": job["kernel"],
                "config": job["config"],
                "grid": job["grid"],
                "num_warps": job["num_warps"],
                "num_stages": job["num_stages"],
                "kind": KERNEL_KIND.get(job["kernel"], kinds[item["case"]]),
                "key": job["key"],
                **{k: v for k, v in res.items() if k not in ("ptxas_log", "error_detail", "case")},
            }
            if res.get("ok"):
                arch = ARCHS[item["target"]]
                row.update(occupancy(arch, job["num_warps"], res["regs"] or 0, res["shared"]))
                row["smem_limit"] = arch.smem_per_block
                row["tensor_cores"] = res["mma_sync"] + res["wgmma"] > 0
            rows.append(row)
    return {
        "triton": triton.__version__,
        "targets": {t: dataclasses.asdict(ARCHS[t]) for t in targets},
        "occupancy_floor_warps": OCCUPANCY_FLOOR,
        "full": full,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------------------------
# Checks, table, plot
# --------------------------------------------------------------------------------------------------------------------
def problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one report row (empty when the launch is clean)."""
    if not row.get("ok"):
        return [f"does not compile: {row.get('error')}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B")
    if row["shared"] > row["smem_limit"]:
        out.append(f"shared memory {row['shared'] / 1024:.0f} KB > {row['smem_limit'] / 1024:.0f} KB per block")
    half = any(("f16" in ops or "bf16" in ops) for ops in row.get("dot_operands", []))
    if half and not row["tensor_cores"]:
        out.append("fp16/bf16 tl.dot without tensor-core instructions")
    floor = OCCUPANCY_FLOOR[row["kind"]]
    if row["shared"] <= row["smem_limit"] and row["warps_per_sm"] < floor:
        out.append(f"{row['warps_per_sm']} warps/SM < floor {floor} ({row['limiter']})")
    return out


def format_static_table(report: dict[str, Any], targets: Sequence[str] | None = None) -> str:
    """One line per (kernel launch, dtype, target): regs, spills, smem, tensor cores, occupancy, problems."""
    head = (
        f"{'op / case':44} {'kernel':38} {'dtype':8} {'target':6} {'warps':>5} {'stg':>3} {'regs':>4} "
        f"{'spill':>6} {'smem KB':>7} {'TC':6} {'occ':>5}  problems"
    )
    lines = [
        f"Static GPU report (Triton {report['triton']}; compiled on this machine for each target, no GPU used)",
        head,
        "-" * len(head),
    ]
    for row in report["rows"]:
        if targets and row["target"] not in targets:
            continue
        case = row["case"].replace(row["op"], "").strip("[]")
        name = f"{row['op']} {case}"[:44]
        if not row.get("ok"):
            lines.append(
                f"{name:44} {row['kernel'][:38]:38} {row['dtype']:8} {row['target']:6} "
                f"{'':>5} {'':>3} {'':>4} {'':>6} {'':>7} {'':6} {'':>5}  FAIL: {row.get('error', '')[:90]}"
            )
            continue
        tc = "wgmma" if row["wgmma"] else ("mma" if row["mma_sync"] else ("-" if not row["dot_operands"] else "fma"))
        lines.append(
            f"{name:44} {row['kernel'][:38]:38} {row['dtype']:8} {row['target']:6} {row['num_warps']:>5} "
            f"{row['num_stages']:>3} {row['regs']:>4} {row['spill_stores']:>6} {row['shared'] / 1024:>7.1f} {tc:6} "
            f"{row['occupancy']:>5.0%}  {'; '.join(problems(row))}"
        )
    return "\n".join(lines)


def save_static_plot(report: dict[str, Any], path: Path) -> None:
    """Two panels per target family: shared memory per block and registers per thread, with the limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("ok")]
    targets = list(report["targets"])
    labels = sorted({f"{r['kernel'].strip('_')} {r['dtype']}" for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(18, max(4, 0.22 * len(labels))), sharey=True)
    ypos = {lab: i for i, lab in enumerate(labels)}
    for ti, target in enumerate(targets):
        sub = [r for r in rows if r["target"] == target]
        off = (ti - len(targets) / 2) * 0.15
        for ax, field, scale in ((axes[0], "shared", 1 / 1024), (axes[1], "regs", 1), (axes[2], "occupancy", 100)):
            xs = [r[field] * scale for r in sub]
            ys = [ypos[f"{r['kernel'].strip('_')} {r['dtype']}"] + off for r in sub]
            bad = [bool(problems(r)) for r in sub]
            ax.scatter(xs, ys, s=14, label=target if field == "shared" else None, color=f"C{ti}", marker="o", alpha=0.8)
            ax.scatter(
                [x for x, b in zip(xs, bad) if b],
                [y for y, b in zip(ys, bad) if b],
                s=60,
                facecolors="none",
                edgecolors="red",
            )
        axes[0].axvline(report["targets"][target]["smem_per_block"] / 1024, color=f"C{ti}", ls=":", lw=1)
    axes[1].axvline(255, color="k", ls=":", lw=1)
    axes[0].set_xlabel("shared memory per block (KB); dotted: each target's per-block limit")
    axes[1].set_xlabel("registers per thread (255 max)")
    axes[2].set_xlabel("theoretical occupancy (%)")
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"fastseg kernels compiled for NVIDIA targets (Triton {report['triton']}); red ring: a problem")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if not row.get("ok"):
        return "**fails to compile**"
    tc = "wgmma" if row["wgmma"] else ("mma" if row["mma_sync"] else ("FMA" if row["dot_operands"] else "-"))
    spill = f", **spills {row['spill_stores']} B**" if row["spill_stores"] else ""
    return f"{row['regs']} / {row['shared'] / 1024:.0f} KB / {tc} / {row['occupancy']:.0%}{spill}"


def markdown_tables(
    report: dict[str, Any], targets: Sequence[str] = ("sm_87", "sm_90"), dtypes: Sequence[str] = ("bfloat16", "float32")
) -> str:
    """README tables: every shipped kernel launch on ``targets`` (registers / shared memory / tensor-core
    instructions / theoretical occupancy, spills if any) and the traffic model."""
    rows = [r for r in report["rows"] if r["shipped"] and r["dtype"] in dtypes]
    keys: list[tuple[str, str, str]] = []
    by_key: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["case"], r["kernel"], r["dtype"])
        if key not in keys:
            keys.append(key)
        by_key.setdefault((*key, r["target"]), r)  # a kernel launched twice per case: the first launch
    names = {t: f"{t} ({report['targets'][t]['device']})" for t in targets}
    out = [
        f"| op [shape] | kernel | dtype | {' | '.join(names[t] for t in targets)} |",
        "|---|---|---|" + "---|" * len(targets),
    ]
    for case, kernel, dtype in keys:
        cells = " | ".join(_cell(by_key.get((case, kernel, dtype, t))) for t in targets)
        out.append(f"| `{case}` | `{kernel.strip('_')}` | {dtype} | {cells} |")
    bad = [r for r in report["rows"] if r["shipped"] and problems(r)]
    out += [
        "",
        f"Cells: registers per thread / shared memory per block / tensor-core instructions in the PTX / "
        f"theoretical occupancy. All {len(report['rows'])} shipped launches x targets (sm_80, sm_86, sm_87, "
        f"sm_89, sm_90; fp32, fp16, bf16): {len(bad)} with a problem. Triton {report['triton']}.",
        "",
    ]
    traffic = report.get("traffic") or []
    if traffic:
        out += [
            "| op [shape] | dtype | (a) min MB | (b) kernel MB | (c) eager MB | b / a | c / b | "
            "roofline of (a): H100 / H200 / AGX Orin, ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in traffic:
            eager = "-" if t["eager_bytes"] is None else f"{t['eager_bytes'] / 1e6:,.0f}"
            ratio = "-" if t["eager_over_kernel"] is None else f"{t['eager_over_kernel']:.1f}"
            out.append(
                f"| `{t['case']}` | {t['dtype']} | {t['min_bytes'] / 1e6:,.1f} | {t['kernel_bytes'] / 1e6:,.0f} "
                f"| {eager} | {t['kernel_over_min']:.2f} | {ratio} | {t['roofline_ms_h100']:.3f} / "
                f"{t['roofline_ms_h200']:.3f} / {t['roofline_ms_orin']:.2f} |"
            )
    models = [m for m in report.get("model_traffic") or [] if "eager_bytes" in m]
    if models:
        out += ["", "| model forward, 1 x 3 x 512 x 512 | eager MB | fused MB | eager / fused |", "|---|---|---|---|"]
        for m in models:
            out.append(
                f"| `{m['model']}` | {m['eager_bytes'] / 1e6:,.0f} | {m['fused_bytes'] / 1e6:,.0f} | "
                f"{m['eager_over_fused']:.2f} |"
            )
    return "\n".join(out)


DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "static"
TRAFFIC_MODELS = (
    "fpn_resnet18",
    "ecenet_resnet18",
    "gss_ff_resnet18",
    "s4mim_resnet18",
    "weaktr_deit_small",  # SemPLeS's CAM model (attention_fusion)
    "mask2former_paper_resnet50",  # PADing's segmenter (masked_class_attention)
)


def run_static(
    full: bool = False,
    out: Path | None = DEFAULT_OUT,
    targets: Sequence[str] | None = None,
    workers: int | None = None,
    say: Callable[[str], None] = print,
    table_targets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The static report and the traffic model: print both, write ``static.json``, ``static.txt``, ``static.png``
    under ``out`` (None: write nothing). Returns the report with ``traffic`` and ``model_traffic`` added."""
    from .traffic import format_traffic_table, model_traffic, op_traffic

    report = static_report(full=full, targets=targets, workers=workers, progress=say)
    report["traffic"] = op_traffic(report, static_cases(full=False)) if "sm_90" in report["targets"] else []
    report["model_traffic"] = model_traffic(list(TRAFFIC_MODELS))
    table = format_static_table(report, table_targets)
    traffic = format_traffic_table(report["traffic"], report["model_traffic"])
    bad = [r for r in report["rows"] if problems(r)]
    summary = (
        f"{len(report['rows'])} kernel launches x targets, {len(bad)} with a problem "
        f"(spills, shared memory over the block limit, no tensor cores for a half dot, occupancy under floor, "
        f"or no compile)"
    )
    say(table)
    say(summary)
    say("")
    say(traffic)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        name = "static_full" if full else "static"
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{name}.txt").write_text(f"{format_static_table(report)}\n{summary}\n\n{traffic}\n")
        save_static_plot(report, out / f"{name}.png")
        say(f"static report: {out / name}.{{json,txt,png}}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m fastseg.bench.static", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the sweep around the shipped shapes too")
    p.add_argument("--targets", nargs="*", default=None, choices=list(ARCHS))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    report = run_static(full=args.full, out=Path(args.out), targets=args.targets, workers=args.workers)
    return 0 if not any(problems(r) for r in report["rows"] if r["shipped"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
