"""Benchmark cases of the `classwise` kernel family (issue 6).

Shapes (S4MIM, performance_anchors.md 4.3):

* ``classwise_reduce``: B = 8, C = 256, H x W in {128x128, 512x512}, K in {21, 150}; bf16 features on a GPU, fp32 on
  the CPU; int64 labels (blocky class maps, 5% ignore), a class-wise patch mask (ratio 0.5).
* ``classwise_masked_recon_loss``: pixels, B = 8, C = 3 at 512x512, K in {21, 150}, MAE-style per-patch
  normalised target (patch 16); fp32.

Modes ``fwd`` and ``fwd_bwd`` (forward, then the gradient w.r.t. the features / the prediction).

Providers: ``triton`` (fast mode: atomics), ``triton_deterministic`` (two-pass, no atomics), ``torch`` (the
reference as the device runs it: ``index_add_`` of pixel rows on CUDA, channels-first ``scatter_add`` on the CPU),
and for the reduce both eager forms explicitly: ``scatter_add`` (channels-first ``scatter_add`` into (B, C, 2K + 1))
and ``index_add`` (``index_add_`` of the transposed pixel rows into (B * 2K + 1, C), the PyG-style code);
``torch_compile`` (``torch.compile`` of the reference). Triton providers skip label validation (one host sync) like
the reference does.

``min_bytes``: fwd = features (or pred + target) read once + labels (8 B) + mask (1 B) per pixel + outputs written
once; fwd_bwd adds the backward's reads of labels, mask, grad_sums (or pred + target again: the backward recomputes
the normalised target) and its gradient write. ``flops``: one add per feature element (reduce); about 4 per element
(subtract, square, accumulate, normalise) for the loss. Both ops are memory-bound: GB/s against the HBM peak is
the figure of merit (targets on H100/H200: fwd+bwd at 512x512x256 bf16 >= 70% of HBM bandwidth, >= 3x the reference,
deterministic within 1.5x of fast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastseg.bench.core import KernelCase, dtype_name, register_kernel_cases, require_compile, require_triton
from fastseg.kernels import (
    classwise_masked_recon_loss,
    classwise_masked_recon_loss_ref,
    classwise_reduce,
    classwise_reduce_ref,
)
from fastseg.kernels._utils import run_triton_on_cpu
from fastseg.layers.masking import classwise_patch_mask

FAMILY = "classwise"
IGNORE = 255


def _class_inputs(
    dev: torch.device, batch: int, height: int, width: int, num_classes: int, patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocky class maps (regions of ~1/8 of the side), 5% ignore pixels, and a class-wise patch mask."""
    gen = torch.Generator(device=dev).manual_seed(0)
    coarse = torch.randint(0, num_classes, (batch, 1, 8, 8), device=dev, generator=gen).float()
    labels = F.interpolate(coarse, size=(height, width), mode="nearest")[:, 0].long()
    labels[torch.rand(batch, height, width, device=dev, generator=gen) < 0.05] = IGNORE
    masked = classwise_patch_mask(labels, patch, 0.5, generator=gen, num_classes=num_classes)
    return labels, masked


def _runner(
    device: torch.device, mode: str, forward: Callable[[dict], torch.Tensor], grad_of: str, interpret: bool = False
) -> Callable[[dict], Callable[[], Any]]:
    """``inputs -> callable`` running ``forward`` (fwd) or forward + gradient w.r.t. ``inputs[grad_of]`` (fwd_bwd)."""

    def factory(inputs: dict) -> Callable[[], Any]:
        leaf = inputs[grad_of]

        def run() -> Any:
            with run_triton_on_cpu(interpret and device.type == "cpu"):
                if mode == "fwd":
                    with torch.no_grad():
                        return forward(inputs)
                x = leaf.detach().requires_grad_()
                out = forward({**inputs, grad_of: x})
                return torch.autograd.grad(out, x, grad_outputs=inputs["grad_out"])[0]

        return run

    return factory


# -------------------------------------------------------------------------------------------------- classwise_reduce


def _reduce_case(
    device: torch.device,
    smoke: bool,
    mode: str,
    batch: int,
    channels: int,
    size: int,
    num_classes: int,
    dtype: torch.dtype,
) -> KernelCase:
    shape_id = f"B{batch}-C{channels}-{size}x{size}-K{num_classes}-{dtype_name(dtype)}"
    if smoke:
        batch, channels, size = 2, 20, 13
    patch = max(1, size // 32)

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        labels, masked = _class_inputs(dev, batch, size, size, num_classes, patch)
        return {
            "features": torch.randn(batch, channels, size, size, device=dev).to(dt),
            "labels": labels,
            "masked": masked,
            "grad_out": torch.randn(batch, num_classes, 2, channels, device=dev),
        }

    def fused(deterministic: bool) -> Callable[[dict], Callable[[], Any]]:
        run = _runner(
            device,
            mode,
            lambda x: classwise_reduce(
                x["features"],
                x["labels"],
                x["masked"],
                num_classes,
                IGNORE,
                deterministic=deterministic,
                impl="triton",
                validate=False,
            )[0],
            "features",
            interpret=True,
        )

        def factory(inputs: dict) -> Callable[[], Any]:
            require_triton(device, smoke)
            return run(inputs)

        return factory

    def compiled(inputs: dict) -> Callable[[], Any]:
        require_compile(device, smoke)
        fn = torch.compile(classwise_reduce_ref, dynamic=False)
        return _runner(device, mode, lambda x: fn(x["features"], x["labels"], x["masked"], num_classes)[0], "features")(
            inputs
        )

    elem = torch.empty((), dtype=dtype).element_size()
    pixels = batch * size * size
    feat_bytes = pixels * channels * elem
    out_bytes = batch * 2 * num_classes * (channels * 4 + 8)
    fwd_bytes = feat_bytes + pixels * 9 + out_bytes
    bwd_bytes = pixels * 9 + batch * 2 * num_classes * channels * 4 + feat_bytes
    return KernelCase(
        family=FAMILY, op="classwise_reduce", shape_id=shape_id, make_inputs=make_inputs,
        providers={
            "triton": fused(False),
            "triton_deterministic": fused(True),
            "torch": _runner(device, mode, lambda x: classwise_reduce_ref(
                x["features"], x["labels"], x["masked"], num_classes)[0], "features"),
            "scatter_add": _runner(device, mode, lambda x: classwise_reduce_ref(
                x["features"], x["labels"], x["masked"], num_classes, method="scatter_add")[0], "features"),
            "index_add": _runner(device, mode, lambda x: classwise_reduce_ref(
                x["features"], x["labels"], x["masked"], num_classes, method="index_add")[0], "features"),
            "torch_compile": compiled,
        },
        flops=float(pixels * channels),
        min_bytes=float(fwd_bytes + (bwd_bytes if mode == "fwd_bwd" else 0)),
        mode=mode, dtype=dtype, reference="torch", quick=size <= 128,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- classwise_masked_recon_loss


def _recon_case(device: torch.device, smoke: bool, mode: str, batch: int, size: int, num_classes: int) -> KernelCase:
    shape_id = f"pixels-B{batch}-C3-{size}x{size}-K{num_classes}-norm16-float32"
    if smoke:
        batch, size = 2, 21
    patch = 16 if not smoke else 4

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        labels, masked = _class_inputs(dev, batch, size, size, num_classes, patch)
        return {
            "pred": torch.randn(batch, 3, size, size, device=dev).to(dt),
            "target": torch.rand(batch, 3, size, size, device=dev).to(dt),
            "labels": labels,
            "masked": masked,
            "grad_out": torch.ones((), device=dev),
        }

    def loss(fn: Callable, **kw: Any) -> Callable[[dict], torch.Tensor]:
        return lambda x: fn(
            x["pred"],
            x["target"],
            x["labels"],
            x["masked"],
            num_classes,
            IGNORE,
            normalize_target=True,
            patch_size=patch,
            **kw,
        )[1]

    def fused(deterministic: bool) -> Callable[[dict], Callable[[], Any]]:
        run = _runner(
            device,
            mode,
            loss(classwise_masked_recon_loss, deterministic=deterministic, impl="triton", validate=False),
            "pred",
            interpret=True,
        )

        def factory(inputs: dict) -> Callable[[], Any]:
            require_triton(device, smoke)
            return run(inputs)

        return factory

    def compiled(inputs: dict) -> Callable[[], Any]:
        require_compile(device, smoke)
        return _runner(device, mode, loss(torch.compile(classwise_masked_recon_loss_ref, dynamic=False)), "pred")(
            inputs
        )

    pixels = batch * size * size
    fwd_bytes = 2 * pixels * 3 * 4 + pixels * 9 + batch * num_classes * 4
    bwd_bytes = 2 * pixels * 3 * 4 + pixels * 9 + batch * num_classes * 4 + pixels * 3 * 4
    return KernelCase(
        family=FAMILY, op="classwise_masked_recon_loss", shape_id=shape_id, make_inputs=make_inputs,
        providers={
            "triton": fused(False),
            "triton_deterministic": fused(True),
            "torch": _runner(device, mode, loss(classwise_masked_recon_loss_ref), "pred"),
            "torch_compile": compiled,
        },
        flops=4.0 * pixels * 3,
        min_bytes=float(fwd_bytes + (bwd_bytes if mode == "fwd_bwd" else 0)),
        mode=mode, dtype=torch.float32, reference="torch", quick=True,
    )  # fmt: skip


@register_kernel_cases(FAMILY)
def classwise_cases(device: torch.device, smoke: bool) -> list[KernelCase]:
    """S4MIM shapes: bf16 features on a GPU, fp32 on the CPU; pixels in fp32."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = []
    for mode in ("fwd", "fwd_bwd"):
        for size in (128, 512):
            for num_classes in (21, 150):
                cases.append(_reduce_case(device, smoke, mode, 8, 256, size, num_classes, low))
        for num_classes in (21, 150):
            cases.append(_recon_case(device, smoke, mode, 8, 512, num_classes))
    if device.type != "cuda":  # the default CPU run (a few minutes on 2 cores) keeps one class count: VOC's 21
        for case in cases:
            case.quick = case.quick and "-K21-" in case.shape_id
    return cases
