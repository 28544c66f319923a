"""Shared plumbing of the kernel families: Triton import guard, `impl` dispatch and input checks.

Dispatch model (the same for every family):

* Every fused op is a ``torch.library.custom_op("fastseg::<op>")``. Its CPU kernel is the plain PyTorch
  reference, its CUDA kernel the Triton launcher. ``torch.export`` / ONNX see one named op and replace it with the
  reference decomposition (each family exports ``DECOMPOSITIONS``).
* The functional entry takes ``impl="auto" | "triton" | "torch"``:

  - ``"torch"``: call the reference directly (plain autograd, no custom op in the graph);
  - ``"auto"``: call the custom op; CUDA tensors run Triton, CPU tensors run the reference;
  - ``"triton"``: Triton for sure: on CUDA the custom op, on the CPU the same op with its CPU kernel switched to the
    Triton launcher, which needs Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
    That is how the CPU-only CI tests the kernels.

Inside an op's CPU kernel, ``use_triton(tensor)`` says which path to take.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator, Sequence

import torch

try:  # Triton is optional: CPU-only installs (macOS, small CPU wheels) run the references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAS_TRITON = False

    class _NoTritonLanguage:
        """Stands in for ``triton.language`` so that kernel signatures (``X: tl.constexpr``) still parse."""

        constexpr = object
        dtype = object

        def __getattr__(self, name: str):
            raise RuntimeError("Triton is not installed; use impl='torch' (the reference) or install triton")

    class _NoTriton:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 if n <= 1 else 1 << (n - 1).bit_length()

        def __getattr__(self, name: str):
            raise RuntimeError("Triton is not installed; use impl='torch' (the reference) or install triton")

    triton = _NoTriton()  # type: ignore[assignment]
    tl = _NoTritonLanguage()  # type: ignore[assignment]

__all__ = [
    "HAS_TRITON",
    "triton",
    "tl",
    "IMPLS",
    "interpreter_enabled",
    "resolve_impl",
    "run_triton_on_cpu",
    "use_triton",
    "check_tensor",
    "check_same_device",
    "GpuTarget",
    "gpu_target",
    "planning_target",
]

IMPLS = ("auto", "triton", "torch")

_TRITON_ON_CPU: contextvars.ContextVar[bool] = contextvars.ContextVar("fastseg_triton_on_cpu", default=False)


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read by Triton at kernel definition)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """Map the user's ``impl`` to one of ``"torch"`` (reference), ``"op"`` (custom op), ``"interpret"``.

    Raises ``ValueError`` for an unknown ``impl`` or for ``impl="triton"`` where Triton cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if tensor.is_cuda:
        if not HAS_TRITON:
            if impl == "triton":
                raise ValueError("impl='triton' but Triton is not installed; `pip install triton` or use impl='torch'")
            return "torch"
        return "op"
    if impl == "auto":
        return "op"  # the custom op's CPU kernel is the reference; keeps the op visible to export
    if tensor.device.type == "cpu" and interpreter_enabled():
        return "interpret"
    raise ValueError(
        f"impl='triton' needs a CUDA tensor, or a CPU tensor with Triton's interpreter on (TRITON_INTERPRET=1 set "
        f"before importing fastseg); got a tensor on {tensor.device} with "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '<unset>')}. Use impl='auto' or impl='torch'."
    )


@contextlib.contextmanager
def run_triton_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Within this context the CPU kernels of fastseg ops run their Triton launchers (interpreter mode).

    With ``enabled=False`` nothing is touched: torch.compile cannot trace a ContextVar mutation, and the normal
    (``impl="auto"``) path must stay compilable.
    """
    if not enabled:
        yield
        return
    token = _TRITON_ON_CPU.set(True)
    try:
        yield
    finally:
        _TRITON_ON_CPU.reset(token)


def use_triton(tensor: torch.Tensor) -> bool:
    """Called inside an op kernel: should this call launch Triton rather than the reference?"""
    if tensor.is_cuda:
        return HAS_TRITON
    return _TRITON_ON_CPU.get() and interpreter_enabled()


def check_tensor(
    name: str,
    tensor: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    op: str = "fastseg",
) -> torch.Tensor:
    """Raise ``ValueError`` with an actionable message unless ``tensor`` is a tensor of the right rank / dtype."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must be one of ({names}), got {str(tensor.dtype).replace('torch.', '')}")
    return tensor


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` when the given tensors do not all sit on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {listing}")


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """What a launcher's tiling may depend on: the compute capability and the number of SMs."""

    capability: tuple[int, int]
    sm_count: int
    smem_per_block: int  # bytes of shared memory one block may use (opt-in maximum)


# Set by `planning_target` while fastseg.bench.static records launches on meta tensors for a GPU that is not here.
_PLANNING_TARGET: contextvars.ContextVar[GpuTarget | None] = contextvars.ContextVar("fastseg_planning_target", default=None)
_DEFAULT_TARGET = GpuTarget((8, 0), 108, 163 * 1024)  # an A100: what the tables assume when nothing says otherwise


def gpu_target(device: torch.device) -> GpuTarget:
    """The GPU a launch runs on: the CUDA device, else the target being planned for (static reports on meta
    tensors), else an A100 (the interpreter, whose tiling does not depend on it)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
        return GpuTarget((props.major, props.minor), props.multi_processor_count, smem)
    return _PLANNING_TARGET.get() or _DEFAULT_TARGET


@contextlib.contextmanager
def planning_target(target: GpuTarget) -> Iterator[None]:
    """Launchers called inside this context (on meta tensors) pick the tiles they would pick on ``target``."""
    token = _PLANNING_TARGET.set(target)
    try:
        yield
    finally:
        _PLANNING_TARGET.reset(token)
