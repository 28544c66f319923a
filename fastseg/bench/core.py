"""Benchmark core shared by `fastseg bench` and the pytest-benchmark suites under `benchmarks/`.

A *kernel case* is one op at one shape with several *providers* (fastseg Triton, the PyTorch reference,
torch.compile of the reference, a peer library). Kernel families register their cases with
`register_kernel_cases`; the CLI and the pytest suites both iterate `kernel_cases()`, so the two never drift.

Timing synchronises the device inside the measurement (CUDA events; pytest-benchmark's host clock does not see
asynchronous GPU work) and reports the median and the p20-p80 band over rounds.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "ProviderUnavailable",
    "require_triton",
    "require_compile",
    "dtype_name",
    "KernelCase",
    "Timing",
    "register_kernel_cases",
    "kernel_cases",
    "kernel_families",
    "measure",
    "synchronize",
    "compare_outputs",
]


class ProviderUnavailable(RuntimeError):
    """Raised by a provider's factory when it cannot run here; the message is the reason shown to the user."""


def require_triton(device: torch.device, smoke: bool) -> None:
    """Triton providers run on CUDA, or through the interpreter in smoke runs; anything else is unavailable."""
    from fastseg.kernels import interpreter_enabled

    if device.type != "cuda" and not (smoke and interpreter_enabled()):
        raise ProviderUnavailable("Triton providers need a CUDA GPU (or TRITON_INTERPRET=1 in smoke mode)")


def require_compile(device: torch.device, smoke: bool) -> None:
    """torch.compile providers are skipped in CPU smoke runs, where compilation would dominate the run."""
    if device.type != "cuda" and smoke:
        raise ProviderUnavailable("torch.compile skipped in CPU smoke runs (compilation dominates; run without smoke)")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass
class KernelCase:
    """One op at one shape.

    Attributes:
        family: kernel family (``"vq"``, ``"class_attention"``, ``"classwise"``).
        op: op name, e.g. ``"vq_nearest"``; with ``mode`` it names the measured callable.
        shape_id: readable shape id, e.g. ``"palette-N1048576-K150-D3-fp32"``.
        mode: ``"fwd"``, ``"bwd"`` or ``"fwd_bwd"``.
        make_inputs: ``(device, dtype) -> inputs`` (any object the providers understand); built once per case.
        providers: provider name -> factory ``inputs -> zero-argument callable``. The factory raises
            `ProviderUnavailable` with a reason when the provider cannot run on this device.
        flops: floating-point operations of one call (0 when not meaningful).
        min_bytes: the fewest bytes one call must move to/from memory (inputs read once, outputs written once).
        reference: the provider that speed-ups are reported against.
        quick: part of the default (fast) set that `fastseg bench` and CI smoke runs use.
    """

    family: str
    op: str
    shape_id: str
    make_inputs: Callable[[torch.device, torch.dtype], Any]
    providers: dict[str, Callable[[Any], Callable[[], Any]]]
    flops: float = 0.0
    min_bytes: float = 0.0
    mode: str = "fwd"
    dtype: torch.dtype = torch.float32
    reference: str = "torch"
    quick: bool = True

    @property
    def name(self) -> str:
        return f"{self.op}-{self.mode}-{self.shape_id}"


_CASE_FACTORIES: dict[str, Callable[[torch.device, bool], Sequence[KernelCase]]] = {}


def register_kernel_cases(family: str) -> Callable:
    """Decorator: ``fn(device, smoke) -> list[KernelCase]`` provides the cases of one kernel family for a device.

    With ``smoke=True`` the factory returns the same cases (same ids) at tiny shapes, so that CI can execute every
    case quickly (including through Triton's interpreter); nothing measured in smoke mode is a performance figure.
    """

    def decorator(fn: Callable[[torch.device, bool], Sequence[KernelCase]]) -> Callable:
        _CASE_FACTORIES[family] = fn
        return fn

    return decorator


def kernel_families() -> list[str]:
    _import_case_modules()
    return sorted(_CASE_FACTORIES)


def kernel_cases(
    device: torch.device, families: Sequence[str] | None = None, quick: bool = False, smoke: bool = False
) -> list[KernelCase]:
    """All registered cases for ``device``, optionally restricted to some families, to the quick set, or shrunk
    to smoke-test shapes."""
    _import_case_modules()
    unknown = set(families or ()) - set(_CASE_FACTORIES)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; known: {sorted(_CASE_FACTORIES)}")
    cases: list[KernelCase] = []
    for family in sorted(families or _CASE_FACTORIES):
        cases.extend(c for c in _CASE_FACTORIES[family](device, smoke) if c.quick or not quick)
    return cases


def _import_case_modules() -> None:
    # Case modules register themselves on import; importing them lazily keeps `import fastseg` light.
    import importlib
    import pkgutil

    from . import cases

    for info in pkgutil.iter_modules(cases.__path__):
        importlib.import_module(f"{cases.__name__}.{info.name}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timing:
    """Per-call times in seconds over ``rounds`` measured rounds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    @property
    def p20(self) -> float:
        return self.quantile(0.2)

    @property
    def p80(self) -> float:
        return self.quantile(0.8)


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 3,
    rounds: int = 10,
    max_seconds: float = 5.0,
) -> Timing:
    """Time ``fn`` per call: up to ``warmup`` warm-up calls (none more once they took ``max_seconds`` / 2: the first
    call of a compiled provider compiles), then up to ``rounds`` rounds, stopping early after ``max_seconds`` (at least 3 rounds). On CUDA each round is
    bracketed by events and synchronised."""
    started = time.perf_counter()
    for _ in range(warmup):
        fn()
        synchronize(device)
        if time.perf_counter() - started > max_seconds / 2:
            break
    synchronize(device)
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(rounds):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        if len(samples) >= 3 and time.perf_counter() - started > max_seconds:
            break
    return Timing(samples)


def _tensors(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def compare_outputs(out: Any, ref: Any, dtype: torch.dtype) -> str | None:
    """Why ``out`` (a provider's result) disagrees with ``ref`` (the reference provider's), or None.

    Floating tensors: max |out - ref| within ``atol + rtol * max |ref|`` (rtol 1e-3 for fp32 inputs, 3e-2 for fp16 /
    bf16: a provider may round differently, never by a visible amount). Integer tensors (indices): at least 99 % equal
    (a near-tie may legitimately resolve differently under another summation order); shapes must match exactly.
    """
    outs, refs = _tensors(out), _tensors(ref)
    if len(outs) != len(refs):
        return f"returns {len(outs)} tensors, the reference {len(refs)}"
    rtol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    for i, (o, r) in enumerate(zip(outs, refs)):
        if tuple(o.shape) != tuple(r.shape):
            return f"output {i}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
        if o.numel() == 0:
            continue
        if o.is_floating_point() or r.is_floating_point():
            o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
            finite = torch.isfinite(r64)
            if not torch.equal(finite, torch.isfinite(o64)):
                return f"output {i}: NaN / inf where the reference has none (or the reverse)"
            scale = r64[finite].abs().max().item() if finite.any() else 0.0
            err = (o64 - r64)[finite].abs().max().item() if finite.any() else 0.0
            if err > 1e-5 + rtol * scale:
                return f"output {i}: max |error| {err:.3g} > {1e-5 + rtol * scale:.3g} (max |ref| {scale:.3g})"
        else:
            agree = (o.cpu() == r.cpu()).double().mean().item()
            if agree < 0.99:
                return f"output {i}: only {agree:.1%} of the integer outputs equal the reference's"
    return None
