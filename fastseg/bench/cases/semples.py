"""Benchmark cases of the two SemPLeS CAM-path ops (issue 17), at the GPU shapes of the spec's D.5b walkthrough
(VOC, stage (c), B = 64, DeiT-S: 12 layers x 6 heads, K = 20 class tokens + 14 x 14 patches, 224 x 224 crops).

* ``attention_fusion``: attn (64, 72, 216, 216), AAF weights (64, 72) -> cross (64, 20, 196), patch (64, 196, 196).
  ``fwd`` (CAM inference) and ``fwd_bwd`` (the gradient w.r.t. the AAF weights only: the maps arrive detached).
  bf16 maps on a GPU (AMP training), fp32 on the CPU.
* ``cam_masked_pairs``: images (64, 3, 224, 224) fp32, fine CAMs (64, 20, 14, 14), P = 96 positive pairs
  (1.5 per image), delta 0.1 -> X_f, X_b (96, 3, 224, 224). ``fwd`` and ``fwd_bwd`` (gradient w.r.t. the CAMs).

Providers: ``triton`` (the fused op), ``torch`` (the reference: for cam_masked_pairs that is the gather of the
positive CAMs + ``F.interpolate`` + amin / amax + two multiplies; note that upstream upsampled all K classes, which
costs more than this reference), ``torch_compile`` (``torch.compile`` of the reference).

``min_bytes``: attention_fusion fwd reads the needed columns of every map once and writes both outputs; the weight
gradient reads them again with the output gradients. cam_masked_pairs fwd reads each pair's image once and writes
X_f and X_b; the backward reads X and both output gradients and writes the CAM gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastseg.bench.core import KernelCase, dtype_name, register_kernel_cases, require_compile, require_triton
from fastseg.kernels._utils import run_triton_on_cpu
from fastseg.kernels.attention_fusion import attention_fusion, attention_fusion_ref
from fastseg.kernels.cam_masked_pairs import cam_masked_pairs, cam_masked_pairs_ref


def _runner(
    device: torch.device, mode: str, forward: Callable[[dict], tuple], grad_of: str, interpret: bool = False
) -> Callable[[dict], Callable[[], Any]]:
    """``inputs -> callable``: the forward, or forward + gradient w.r.t. ``inputs[grad_of]`` (``fwd_bwd``)."""

    def factory(inputs: dict) -> Callable[[], Any]:
        def run() -> Any:
            with run_triton_on_cpu(interpret and device.type == "cpu"):
                if mode == "fwd":
                    with torch.no_grad():
                        return forward(inputs)
                leaf = inputs[grad_of].detach().requires_grad_()
                outs = forward({**inputs, grad_of: leaf})
                return torch.autograd.grad(outs, leaf, grad_outputs=inputs["grad_out"])[0]

        return run

    return factory


def _providers(
    device: torch.device, smoke: bool, mode: str, fused: Callable, ref: Callable, grad_of: str
) -> dict[str, Callable]:
    fused_run = _runner(device, mode, fused, grad_of, interpret=True)

    def triton_factory(inputs: dict) -> Callable[[], Any]:
        require_triton(device, smoke)
        return fused_run(inputs)

    def compiled(inputs: dict) -> Callable[[], Any]:
        require_compile(device, smoke)
        return _runner(device, mode, torch.compile(ref, dynamic=False), grad_of)(inputs)

    return {"triton": triton_factory, "torch": _runner(device, mode, ref, grad_of), "torch_compile": compiled}


def _fusion_case(device: torch.device, smoke: bool, mode: str, dtype: torch.dtype) -> KernelCase:
    batch, maps, k, p = 64, 72, 20, 196
    shape_id = f"B{batch}-M{maps}-K{k}-P{p}-{dtype_name(dtype)}"
    if smoke:
        batch, maps, k, p = 2, 3, 2, 9
    n = k + p

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        gen = torch.Generator(device=dev).manual_seed(0)
        attn = torch.rand(batch, maps, n, n, device=dev, generator=gen).to(dt)
        return {
            "attn": attn,
            "weights": torch.rand(batch, maps, device=dev, generator=gen),
            "grad_out": (torch.randn(batch, k, p, device=dev).to(dt), torch.randn(batch, p, p, device=dev).to(dt)),
        }

    fused = lambda x: attention_fusion(x["attn"], x["weights"], k, impl="triton")  # noqa: E731
    ref = lambda x: attention_fusion_ref(x["attn"], x["weights"], k)  # noqa: E731
    elem = torch.empty((), dtype=dtype).element_size()
    read = batch * maps * n * p * elem + batch * maps * 4
    out = batch * n * p * elem
    min_bytes = read + out + ((read + out + batch * maps * 4) if mode == "fwd_bwd" else 0)
    return KernelCase(
        family="attention_fusion",
        op="attention_fusion",
        shape_id=shape_id,
        make_inputs=make_inputs,
        providers=_providers(device, smoke, mode, fused, ref, "weights"),
        flops=2.0 * batch * maps * n * p * (2 if mode == "fwd_bwd" else 1),
        min_bytes=float(min_bytes),
        mode=mode,
        dtype=dtype,
        reference="torch",
        quick=True,
    )


def _pairs_case(device: torch.device, smoke: bool, mode: str) -> KernelCase:
    batch, channels, size, k, grid, pairs = 64, 3, 224, 20, 14, 96
    shape_id = f"B{batch}-C{channels}-{size}x{size}-K{k}-cam{grid}-P{pairs}-float32"
    if smoke:
        batch, size, k, grid, pairs = 2, 19, 3, 4, 3

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        gen = torch.Generator(device=dev).manual_seed(0)
        pair_image = torch.arange(pairs, device=dev) * batch // pairs  # about 1.5 pairs per image
        pair_class = torch.randint(0, k, (pairs,), device=dev, generator=gen)
        return {
            "images": torch.randn(batch, channels, size, size, device=dev, generator=gen).to(dt),
            "cams": torch.rand(batch, k, grid, grid, device=dev, generator=gen),
            "pair_image": pair_image,
            "pair_class": pair_class,
            "grad_out": tuple(torch.randn(pairs, channels, size, size, device=dev).to(dt) for _ in range(2)),
        }

    fused = lambda x: cam_masked_pairs(
        x["images"],
        x["cams"],
        x["pair_image"],
        x["pair_class"],
        0.1,  # noqa: E731
        impl="triton",
        validate=False,
    )
    ref = lambda x: cam_masked_pairs_ref(x["images"], x["cams"], x["pair_image"], x["pair_class"], 0.1)  # noqa: E731
    pixels = pairs * size * size
    fwd_bytes = pixels * channels * 4 * 3 + pairs * grid * grid * 4
    bwd_bytes = pixels * channels * 4 * 3 + batch * k * grid * grid * 4
    return KernelCase(
        family="cam_masked_pairs",
        op="cam_masked_pairs",
        shape_id=shape_id,
        make_inputs=make_inputs,
        providers=_providers(device, smoke, mode, fused, ref, "cams"),
        flops=float(pixels * (12 + 2 * channels) * (2 if mode == "fwd_bwd" else 1)),
        min_bytes=float(fwd_bytes + (bwd_bytes if mode == "fwd_bwd" else 0)),
        mode=mode,
        dtype=torch.float32,
        reference="torch",
        quick=True,
    )


@register_kernel_cases("attention_fusion")
def attention_fusion_cases(device: torch.device, smoke: bool) -> list[KernelCase]:
    """D.5b shapes; bf16 maps on a GPU, fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [_fusion_case(device, smoke, mode, dtype) for mode in ("fwd", "fwd_bwd")]


@register_kernel_cases("cam_masked_pairs")
def cam_masked_pairs_cases(device: torch.device, smoke: bool) -> list[KernelCase]:
    """D.5b shapes, fp32 images (the masking runs on the fp32 normalised tensors)."""
    return [_pairs_case(device, smoke, mode) for mode in ("fwd", "fwd_bwd")]
