"""Benchmark cases of the `vq` kernel family (issue 4).

Shapes (GSS at 512x512, performance_anchors.md 2.6):

* ``vq_nearest`` palette inverse: N = 1024*1024 pixels of the 2x maskige, K = 150 colours, D = 3 (fp32).
* ``vq_nearest`` tokenizer quantisation: N = 8*64*64, K in {1024, 8192}, D = 256 (bf16 on a GPU, fp32 on the CPU).
* ``vq_nearest`` CPU target: N = 65536, K = 1024, D = 64 (fp32), where the chunked reference is compared with FAISS.
* ``argmax_matmul`` token head: N = 128*128, C = 2048, K = 8192 (bf16 on a GPU, fp32 on the CPU).

Providers: ``triton`` (fastseg), ``torch`` (the chunked reference), ``blocked`` (fastseg's CPU path: what
``impl="auto"`` runs on CPU tensors, L2-sized blocks with a running argmin; CPU only), ``matmul_argmin`` / ``matmul_argmax`` (the best
plain PyTorch: one GEMM writing N x K scores, then argmin / argmax), ``cdist`` (``torch.cdist`` + argmin),
``torch_compile`` (``torch.compile`` of the reference's dense, loop-free graph: the export decomposition), and
``faiss`` (``faiss-cpu`` ``IndexFlatL2``, k = 1; CPU tensors only, run with torch's thread count: faiss has its own
OpenMP runtime). Every provider returns indices and distances (values for argmax), so they do the same work.
``benchmarks/vq_vs_faiss.py`` times ``blocked`` against ``faiss`` in separate processes under each OpenMP wait
policy (the two OpenMP runtimes' spinning threads would otherwise slow each other down).

``flops`` = 2 N K D (the cross term); ``min_bytes`` = inputs read once + outputs written once (int64 index and fp32
distance / value per row): the fused kernels are compute-bound (AI ~ N K / (N + K)), so TFLOP/s over the dense peak
is the figure of merit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastseg.bench.core import (
    KernelCase,
    ProviderUnavailable,
    dtype_name,
    register_kernel_cases,
    require_compile,
    require_triton,
)
from fastseg.kernels import DECOMPOSITIONS, argmax_matmul, argmax_matmul_ref, vq_nearest, vq_nearest_ref

# The export decompositions (what torch.compile of the reference is timed on), looked up by op so that this file does
# not depend on which kernel file defines them.
_vq_nearest_decomposition = DECOMPOSITIONS[torch.ops.fastseg.vq_nearest.default]
_argmax_matmul_decomposition = DECOMPOSITIONS[torch.ops.fastseg.argmax_matmul.default]

FAMILY = "vq"


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


# ------------------------------------------------------------------------------------------------------- vq_nearest


def _matmul_argmin(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What plain PyTorch VQ layers do (taming-transformers style), in the input dtype: N x K scores, argmin."""
    code_sq = (codebook * codebook).sum(1)
    scores = torch.addmm(code_sq, z, codebook.t(), alpha=-2.0)
    best, index = scores.min(1)
    return index, (best.float() + (z.float() ** 2).sum(1)).clamp_(min=0)


def _cdist(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    best, index = torch.cdist(z, codebook).min(1)
    return index, best.float() ** 2


def _faiss_provider(device: torch.device) -> Callable[[dict], Callable[[], Any]]:
    def factory(inputs: dict) -> Callable[[], Any]:
        if device.type != "cpu":
            raise ProviderUnavailable("faiss-cpu is a CPU peer: it is timed on CPU runs only")
        try:
            import faiss
        except ImportError as why:
            raise ProviderUnavailable(f"faiss-cpu is not installed ({why}); pip install faiss-cpu") from why
        faiss.omp_set_num_threads(torch.get_num_threads())  # its own OpenMP runtime: the same thread count as torch
        index = faiss.IndexFlatL2(inputs["codebook"].shape[1])
        index.add(inputs["codebook"].float().contiguous().numpy())
        queries = inputs["z"].float().contiguous().numpy()

        def search() -> tuple[torch.Tensor, torch.Tensor]:
            dist, idx = index.search(queries, 1)
            return torch.from_numpy(idx[:, 0]), torch.from_numpy(dist[:, 0])  # zero-copy views, as the others

        return search

    return factory


def _vq_case(device: torch.device, smoke: bool, name: str, n: int, k: int, d: int, dtype: torch.dtype,
             quick: bool) -> KernelCase:  # fmt: skip
    shape_id = f"{name}-N{n}-K{k}-D{d}-{dtype_name(dtype)}"
    if smoke:
        n, k, d = 300, min(k, 70), min(d, 40)

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        scale = 255.0 if name == "palette" else 1.0
        return {
            "z": (torch.rand(n, d, device=dev) * scale).to(dt),
            "codebook": (torch.rand(k, d, device=dev) * scale).to(dt),
        }

    def triton_provider(x: dict) -> Callable[[], Any]:
        require_triton(device, smoke)
        return _no_grad(lambda: vq_nearest(x["z"], x["codebook"], impl="triton"))

    def blocked_provider(x: dict) -> Callable[[], Any]:
        if device.type != "cpu":
            raise ProviderUnavailable("the blocked path is fastseg's CPU path (on CUDA impl='auto' runs Triton)")
        return _no_grad(lambda: vq_nearest(x["z"], x["codebook"], impl="auto"))

    def compile_provider(x: dict) -> Callable[[], Any]:
        require_compile(device, smoke)
        compiled = torch.compile(_vq_nearest_decomposition, dynamic=False)
        return _no_grad(lambda: compiled(x["z"], x["codebook"]))

    elem = torch.empty((), dtype=dtype).element_size()
    return KernelCase(
        family=FAMILY, op="vq_nearest", shape_id=shape_id, make_inputs=make_inputs,
        providers={
            "triton": triton_provider,
            "torch": lambda x: _no_grad(lambda: vq_nearest_ref(x["z"], x["codebook"])),
            "blocked": blocked_provider,
            "matmul_argmin": lambda x: _no_grad(lambda: _matmul_argmin(x["z"], x["codebook"])),
            "cdist": lambda x: _no_grad(lambda: _cdist(x["z"], x["codebook"])),
            "torch_compile": compile_provider,
            "faiss": _faiss_provider(device),
        },
        flops=2.0 * n * k * d,
        min_bytes=float(elem * (n * d + k * d) + n * (8 + 4)),
        mode="fwd", dtype=dtype, reference="torch", quick=quick,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- argmax_matmul


def _head_case(
    device: torch.device, smoke: bool, n: int, c: int, k: int, dtype: torch.dtype, quick: bool
) -> KernelCase:
    shape_id = f"token_head-N{n}-C{c}-K{k}-{dtype_name(dtype)}"
    if smoke:
        n, c, k = 200, 48, 90

    def make_inputs(dev: torch.device, dt: torch.dtype) -> dict:
        return {
            "x": torch.randn(n, c, device=dev).to(dt),
            "weight": (torch.randn(k, c, device=dev) / c**0.5).to(dt),
            "bias": torch.randn(k, device=dev).to(dt),
        }

    def triton_provider(x: dict) -> Callable[[], Any]:
        require_triton(device, smoke)
        return _no_grad(lambda: argmax_matmul(x["x"], x["weight"], x["bias"], impl="triton"))

    def compile_provider(x: dict) -> Callable[[], Any]:
        require_compile(device, smoke)
        compiled = torch.compile(_argmax_matmul_decomposition, dynamic=False)
        return _no_grad(lambda: compiled(x["x"], x["weight"], x["bias"]))

    def matmul_argmax(x: dict) -> Callable[[], Any]:
        # the obvious PyTorch head: write the logits in the input dtype, then max over K
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            value, index = torch.nn.functional.linear(x["x"], x["weight"], x["bias"]).max(1)
            return index, value  # the reference's order: (index, value)

        return _no_grad(run)

    elem = torch.empty((), dtype=dtype).element_size()
    return KernelCase(
        family=FAMILY, op="argmax_matmul", shape_id=shape_id, make_inputs=make_inputs,
        providers={
            "triton": triton_provider,
            "torch": lambda x: _no_grad(lambda: argmax_matmul_ref(x["x"], x["weight"], x["bias"])),
            "matmul_argmax": matmul_argmax,
            "torch_compile": compile_provider,
        },
        flops=2.0 * n * k * c,
        min_bytes=float(elem * (n * c + k * c + k) + n * (8 + 4)),
        mode="fwd", dtype=dtype, reference="torch", quick=quick,
    )  # fmt: skip


@register_kernel_cases(FAMILY)
def vq_cases(device: torch.device, smoke: bool) -> list[KernelCase]:
    """GSS shapes at 512x512: bf16 on a GPU (palette in fp32), fp32 on the CPU."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = device.type == "cuda"  # the default (quick) CPU run keeps its own target shape (seconds per call otherwise)
    return [
        _vq_case(device, smoke, "palette", 1024 * 1024, 150, 3, torch.float32, quick=gpu),
        _vq_case(device, smoke, "tokenizer", 8 * 64 * 64, 1024, 256, low, quick=gpu),  # CPU: the cpu_target below
        _vq_case(device, smoke, "tokenizer", 8 * 64 * 64, 8192, 256, low, quick=False),
        _vq_case(device, smoke, "cpu_target", 65536, 1024, 64, torch.float32, quick=True),
        _head_case(device, smoke, 128 * 128, 2048, 8192, low, quick=gpu),
    ]
