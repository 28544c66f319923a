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

Besides the dispatch this module holds what every op file shares, so that no op file keeps its own copy:

* the numerics policy: `dot_precision` (the ONE fp32 dot-precision rule) and `LOG2E`;
* the launch-size helpers: `pow2` (power-of-two block sizes), `target_programs` (how many programs fill the
  device) and `num_splits` (how to split a long axis over programs);
* input checks with actionable ``ValueError`` s (`check_tensor`, `check_same_device`, `check_qkv` for the two
  attention ops, `check_groups` / `check_label_values` for the class-wise ops) and the limits shared by several ops;
* the one Triton kernel two ops share: `split_sum_kernel`, the fixed-order second pass of the deterministic
  class-wise reductions.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

try:  # Triton is optional: CPU-only installs (macOS, small CPU wheels) run the references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAS_TRITON = False

    class _NoTritonLanguage:
        """Stands in for ``triton.language`` so that kernel signatures (``X: tl.constexpr``) and module-level
        constants (``tl.constexpr(1.0)``) still parse."""

        dtype = object

        @staticmethod
        def constexpr(value=None):
            return value

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
    "check_qkv",
    "kernel_fits",
    "check_groups",
    "check_label_values",
    "resolve_deterministic",
    "acc_dtype",
    "kernel_dtype",
    "FLOAT_DTYPES",
    "LABEL_DTYPES",
    "MAX_HEAD_DIM",
    "MAX_CLASSWISE_CLASSES",
    "LOG2E",
    "REF_CHUNK_ELEMENTS",
    "ref_chunk_rows",
    "run_on_cpu_threads",
    "dot_precision",
    "pow2",
    "target_programs",
    "num_splits",
    "strides",
    "split_sum",
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


# --------------------------------------------------------------------------------------------------------------------
# Shared constants and limits
# --------------------------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every op takes; classwise adds float64
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
MAX_HEAD_DIM = 128  # both attention kernels keep one head's d on chip (padded to a power of two)
MAX_CLASSWISE_CLASSES = 65536
# log2(e): the kernels use exp2 / log2 (one instruction each) on base-2 logits, x * LOG2E.
LOG2E = tl.constexpr(1.4426950408889634)
# Largest slice of an N x K score matrix a chunked reference holds at once (16 MB in fp32).
REF_CHUNK_ELEMENTS = 2**22


def ref_chunk_rows(k: int) -> int:
    """Rows per chunk of a chunked reference over an N x K score matrix (at most `REF_CHUNK_ELEMENTS` alive)."""
    return max(1, REF_CHUNK_ELEMENTS // max(k, 1))


# CPU paths that run many small torch ops per call (one GEMM and a few reductions per L2-sized block) parallelise over
# blocks with Python threads whose own torch ops are single-threaded, instead of inside every op: one OpenMP region
# per op and block meant hundreds of thread wake-ups per call, each a stall when OpenMP threads spin and another
# process holds the cores (10-50x slower beside one busy process). These threads wait on a queue, never spin.
_CPU_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool); a forked child makes its own
_CPU_POOL_LOCK = threading.Lock()


def _cpu_pool(threads: int) -> ThreadPoolExecutor:
    global _CPU_POOL
    with _CPU_POOL_LOCK:
        if _CPU_POOL is None or _CPU_POOL[:2] != (os.getpid(), threads):
            if _CPU_POOL is not None and _CPU_POOL[0] == os.getpid():
                _CPU_POOL[2].shutdown(wait=False)
            started = threading.Barrier(threads + 1)

            def single_threaded() -> None:
                # OpenMP's and MKL's thread counts are per thread: get_num_threads() first runs torch's lazy per-thread
                # initialisation (which would otherwise reset the count later), then this thread is set to one.
                torch.get_num_threads()
                torch.set_num_threads(1)
                started.wait()

            pool = ThreadPoolExecutor(threads, thread_name_prefix="fastseg-cpu", initializer=single_threaded)
            for _ in range(threads):  # every worker starts now (each waits in its initializer, so none is idle)
                pool.submit(int)
            started.wait()
            torch.set_num_threads(threads)  # set_num_threads(1) also changed torch's process-wide default: restore it
            _CPU_POOL = (os.getpid(), threads, pool)
        return _CPU_POOL[2]


def run_on_cpu_threads(work: Callable[[Sequence[int]], None], items: Sequence[int]) -> None:
    """``work(items[i::t])`` for ``t = min(torch.get_num_threads(), len(items))`` shares, each on a worker thread whose
    torch ops run single-threaded (inline in the caller when torch has one thread); grad and inference mode follow
    the caller's. ``work`` writes its results into disjoint slices of preallocated outputs. Run every op of a call
    this way: an op left in the caller opens OpenMP regions of its own (one of 16 chunks of exact distances took 60 ms
    per region beside a busy process with spinning threads)."""
    threads = torch.get_num_threads()
    if threads <= 1 or not items:
        work(items)
        return
    shares = min(threads, len(items))
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()

    def run(share: Sequence[int]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(share)

    pool = _cpu_pool(threads)
    for future in [pool.submit(run, items[i::shares]) for i in range(shares)]:
        future.result()


# --------------------------------------------------------------------------------------------------------------------
# Numerics policy
# --------------------------------------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of every ``tl.dot`` whose operands come from a tensor of ``dtype``.

    fp32 (and fp64, which the kernels run in fp32) callers expect fp32 results: ``"ieee"`` (no TF32, which would cost
    about 1e-3 relative error; DESIGN.md, reliability.md 1.5), so the kernels match their fp32 references. For fp16 /
    bf16 operands Triton ignores the setting (half products, fp32 accumulation); ``"tf32"`` is passed for them.
    """
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# --------------------------------------------------------------------------------------------------------------------
# Launch sizes
# --------------------------------------------------------------------------------------------------------------------


def pow2(n: int, floor: int = 16, cap: int | None = None) -> int:
    """``n`` rounded up to a power of two, at least ``floor`` (``tl.dot`` needs every dimension >= 16) and at most
    ``cap``."""
    size = max(floor, triton.next_power_of_2(max(int(n), 1)))
    return size if cap is None else min(size, cap)


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: ~4 waves of SMs on a GPU; a few in the interpreter, so that the split
    paths are exercised by the CPU tests without making them slow."""
    if device.type in ("cuda", "meta"):  # meta: a launch planned for a GPU by fastseg.bench.static
        return 4 * gpu_target(device).sm_count
    return 4


def num_splits(n: int, block_n: int, other_programs: int, target: int, splits: int | None = None) -> tuple[int, int]:
    """Split an axis of ``n`` elements over programs, in chunks that are multiples of ``block_n``, so that
    ``other_programs * splits`` reaches ``target`` programs (``splits`` forces the count, as tests do).

    Returns ``(splits, chunk)``: the number of non-empty chunks and their length.
    """
    tiles = triton.cdiv(n, block_n)
    if splits is None:
        splits = max(1, min(tiles, target // max(other_programs, 1)))
    splits = max(1, min(int(splits), tiles))
    chunk = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(n, chunk), chunk


def strides(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.stride())


# --------------------------------------------------------------------------------------------------------------------
# Checks shared by the two attention ops
# --------------------------------------------------------------------------------------------------------------------


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> float:
    """Check q (B, h, *, d), k and v (B, h, L, d) and return the logit scale (``d ** -0.5`` when None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, op=op)
    check_same_device(op, q=q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"{op}: k and v must have the same shape (B, h, L, d), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{op}: q (B, h, *, d) and k / v (B, h, *, d) must agree on batch, heads and head dim, got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if scale is None:
        return q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def kernel_fits(op: str, impl: str, mode: str, problems: list[str]) -> str:
    """Downgrade to the reference where a Triton kernel's limits are exceeded (impl='auto'), or refuse
    (impl='triton')."""
    if mode == "torch" or not problems:
        return mode
    if impl == "triton":
        raise ValueError(f"{op}: the Triton kernel does not support {'; '.join(problems)}; use impl='torch' or 'auto'")
    return "torch"


# --------------------------------------------------------------------------------------------------------------------
# Checks and helpers shared by the class-wise ops
# --------------------------------------------------------------------------------------------------------------------


def check_groups(
    op: str, labels: torch.Tensor, masked: torch.Tensor, spatial: tuple[int, ...], num_classes: int, ignore_index: int
) -> None:
    """Check labels / masked (B, H, W), num_classes and an ignore_index that names no class."""
    check_tensor("labels", labels, ndim=3, dtypes=LABEL_DTYPES, op=op)
    check_tensor("masked", masked, ndim=3, dtypes=(torch.bool,), op=op)
    if tuple(labels.shape) != spatial or tuple(masked.shape) != spatial:
        raise ValueError(
            f"{op}: labels {tuple(labels.shape)} and masked {tuple(masked.shape)} must both have shape "
            f"(B, H, W) = {spatial}"
        )
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or not 1 <= num_classes <= MAX_CLASSWISE_CLASSES
    ):
        raise ValueError(f"{op}: num_classes must be an int in [1, {MAX_CLASSWISE_CLASSES}], got {num_classes!r}")
    if not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
        raise ValueError(
            f"{op}: ignore_index must be an int outside [0, num_classes={num_classes}) so that it names "
            f"no class, got {ignore_index!r}"
        )


def check_label_values(op: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, K)`` that is not ``ignore_index`` (one host sync)."""
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"{op}: labels contain the value {value}, outside [0, num_classes={num_classes}) and not "
            f"ignore_index={ignore_index}"
        )


def resolve_deterministic(op: str, deterministic: bool | None, tensor: torch.Tensor) -> bool:
    """``None`` follows ``torch.are_deterministic_algorithms_enabled()``; an explicit ``False`` on CUDA while that
    flag is on raises PyTorch's alert (or warns in warn-only mode)."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    if not deterministic and tensor.is_cuda and torch.are_deterministic_algorithms_enabled():
        # Our Triton atomics are invisible to PyTorch's own alert machinery, so raise the same alert by hand.
        message = (
            f"{op} with deterministic=False uses atomic adds and is not deterministic; pass deterministic=True "
            f"or None while torch.use_deterministic_algorithms(True) is on"
        )
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=3)
        else:
            raise RuntimeError(message)
    return bool(deterministic)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / output dtype of the class-wise ops: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """fp64 runs in fp32; bf16 too under the interpreter, whose numpy back end has no bf16 arithmetic."""
    if tensor.dtype == torch.float64 or (tensor.dtype == torch.bfloat16 and interpreter_enabled()):
        return tensor.float()
    return tensor


@triton.jit
def split_sum_kernel(
    part_ptr,  # (B, S, N) fp32 per-split partials, contiguous
    out_ptr,  # (B, N) fp32, contiguous
    S,
    N,
    BLOCK: tl.constexpr,
):
    """out[b, i] = sum_s part[b, s, i], s in increasing order (the deterministic second pass)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(part_ptr + (b * S + s) * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + b * N + offs, acc, mask=mask)


SPLIT_SUM_BLOCK = 1024


def split_sum(part: torch.Tensor) -> torch.Tensor:
    """``part.sum(1)`` of a contiguous fp32 ``(B, S, N)`` tensor in a fixed order (bitwise reproducible)."""
    batch, splits, n = part.shape
    out = torch.empty((batch, n), dtype=torch.float32, device=part.device)
    split_sum_kernel[(triton.cdiv(n, SPLIT_SUM_BLOCK), batch)](part, out, splits, n, BLOCK=SPLIT_SUM_BLOCK)
    return out


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """What a launcher's tiling may depend on: the compute capability and the number of SMs."""

    capability: tuple[int, int]
    sm_count: int
    smem_per_block: int  # bytes of shared memory one block may use (opt-in maximum)


# Set by `planning_target` while fastseg.bench.static records launches on meta tensors for a GPU that is not here.
_PLANNING_TARGET: contextvars.ContextVar[GpuTarget | None] = contextvars.ContextVar(
    "fastseg_planning_target", default=None
)
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
