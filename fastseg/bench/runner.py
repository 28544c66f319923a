"""`fastseg bench`: run kernel cases and model throughput on the local device, print a table, save JSON and a plot.

Kernel rows: every registered `KernelCase` x provider (fastseg Triton, reference, torch.compile, peers).
Model rows: every selected model x provider:

* ``eager``: the model with ``impl="torch"`` (plain PyTorch reference ops everywhere);
* ``fused``: ``impl="auto"``; fastseg's Triton kernels on CUDA (skipped on a CPU, where it equals ``eager``);
* ``compile``: ``torch.compile`` of the eager model;
* ``onnxruntime``: the model exported to ONNX and run by ONNX Runtime (when `fastseg.export` is installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .core import KernelCase, ProviderUnavailable, kernel_cases, measure
from .env import environment_info
from .roofline import peak_for, roofline_fraction

__all__ = [
    "BenchRow",
    "run_kernels",
    "run_models",
    "run_stages",
    "model_provider",
    "format_table",
    "save_json",
    "save_plot",
    "MODEL_PROVIDERS",
]

MODEL_PROVIDERS = ("eager", "fused", "compile", "onnxruntime")


@dataclasses.dataclass
class BenchRow:
    kind: str  # "kernel" | "model"
    name: str  # op-mode or model name
    provider: str
    shape: str
    dtype: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    roofline: float | None = None  # fraction of the device's roofline bound
    speedup: float | None = None  # over the reference provider of the same case
    images_per_s: float | None = None
    note: str = ""  # why a provider did not run, or a caveat
    seconds: float | None = None  # wall time of the whole job: set-up (compile, export), warm-up and timed rounds

    @property
    def ok(self) -> bool:
        return self.median_ms is not None


def _timed_row(
    base: BenchRow, fn: Callable[[], Any], device: torch.device, rounds: int, budget_s: float = 5.0
) -> BenchRow:
    timing = measure(fn, device, warmup=2, rounds=rounds, max_seconds=budget_s)
    base.median_ms, base.p20_ms, base.p80_ms = timing.median * 1e3, timing.p20 * 1e3, timing.p80 * 1e3
    return base


def run_kernels(
    device: torch.device,
    families: Sequence[str] | None = None,
    quick: bool = True,
    rounds: int = 10,
    progress: bool = True,
    budget_s: float = 5.0,
) -> list[BenchRow]:
    """Time every (case, provider) of the selected kernel families on ``device`` (warm-up and timed rounds of each
    stop after about ``budget_s`` seconds; at least one warm-up call and three rounds)."""
    peak = peak_for(device)
    rows: list[BenchRow] = []
    cases: list[KernelCase] = kernel_cases(device, families, quick=quick)
    jobs = [(case, provider) for case in cases for provider in case.providers]
    inputs_cache: dict[str, Any] = {}
    for case, provider in tqdm(jobs, desc="kernels", disable=not progress, leave=False):
        row = BenchRow(
            "kernel", f"{case.op}-{case.mode}", provider, case.shape_id, str(case.dtype).replace("torch.", "")
        )
        started = time.perf_counter()
        try:
            if case.name not in inputs_cache:
                inputs_cache.clear()  # one case's inputs alive at a time
                inputs_cache[case.name] = case.make_inputs(device, case.dtype)
            fn = case.providers[provider](inputs_cache[case.name])
            _timed_row(row, fn, device, rounds, budget_s)
        except ProviderUnavailable as why:
            row.note = str(why)
        except Exception as err:  # a failing provider must not hide the others' figures
            row.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        row.seconds = time.perf_counter() - started
        if row.ok:
            seconds = row.median_ms / 1e3
            row.gbps = case.min_bytes / seconds / 1e9 if case.min_bytes else None
            row.tflops = case.flops / seconds / 1e12 if case.flops else None
            row.roofline = roofline_fraction(seconds, case.flops, case.min_bytes, peak, case.dtype)
        rows.append(row)
    _fill_speedups(rows, {(f"{c.op}-{c.mode}", c.shape_id): c.reference for c in cases})
    return rows


def _fill_speedups(rows: list[BenchRow], references: dict[tuple[str, str], str]) -> None:
    by_key = {(r.name, r.shape, r.provider): r for r in rows}
    for row in rows:
        ref = by_key.get((row.name, row.shape, references.get((row.name, row.shape), "")))
        if row.ok and ref is not None and ref.ok:
            row.speedup = ref.median_ms / row.median_ms


def _build_model(name: str, impl: str | None, num_classes: int | None) -> torch.nn.Module:
    from ..registry import create_model

    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if impl is not None:
        kwargs["impl"] = impl
    return create_model(name, **kwargs).eval()


def model_provider(
    name: str, provider: str, device: torch.device, images: torch.Tensor, num_classes: int | None
) -> Callable[[], Any]:
    """A zero-argument callable running model ``name`` on ``images`` through ``provider``; raises
    `ProviderUnavailable` with the reason when the provider cannot run here."""
    from ..registry import create_model

    probe = create_model(name, **({} if num_classes is None else {"num_classes": num_classes}))
    fused = getattr(probe, "has_fused_ops", False)
    del probe
    if provider == "eager":
        model = _build_model(name, "torch" if fused else None, num_classes).to(device)
    elif provider == "fused":
        if not fused:
            raise ProviderUnavailable("model has no fused ops (same as eager)")
        if device.type != "cuda":
            raise ProviderUnavailable("fused Triton kernels need a CUDA GPU; on CPU the ops run their reference")
        model = _build_model(name, "auto", num_classes).to(device)
    elif provider == "compile":
        model = torch.compile(_build_model(name, "torch" if fused else None, num_classes).to(device))
    elif provider == "onnxruntime":
        return _onnxruntime_provider(name, device, images, num_classes)
    else:
        raise ValueError(f"unknown model provider {provider!r}; known: {MODEL_PROVIDERS}")

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(images)

    return run


def export_onnx_session(
    model_name: str,
    images: torch.Tensor,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
):
    """An ``onnxruntime.InferenceSession`` of ``model_name`` exported (static) at the shape of ``images``.

    Used by ``fastseg bench``'s ``onnxruntime`` provider: the file goes to a temporary folder that is removed once
    the session has loaded it. The CUDA execution provider is used when ``device`` is CUDA and it is available.
    Random weights (seeded) are fine for timing.
    """
    import onnxruntime as ort

    from ..export.api import export
    from ..export.onnx import ort_providers

    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    with tempfile.TemporaryDirectory(prefix="fastseg-onnx-") as tmp:
        path = export(
            model_name,
            format="onnx",
            imgsz=(h, w),
            batch=b,
            num_classes=num_classes,
            out=Path(tmp) / f"{model_name}.onnx",
            tensorrt_check=False,
        )
        options = ort.SessionOptions()
        if torch.device(device).type == "cpu":
            # ONNX Runtime has its own thread pool: the same thread count as torch's timed region, and no spinning
            # when OpenMP is told not to (its spinning threads crawl beside another busy process, as OpenMP's do).
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), sess_options=options, providers=ort_providers(device))


def _onnxruntime_provider(
    name: str, device: torch.device, images: torch.Tensor, num_classes: int | None
) -> Callable[[], Any]:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ProviderUnavailable(f"ONNX Runtime provider unavailable: {err}") from None
    session = export_onnx_session(name, images, num_classes=num_classes, device=device)
    feed = {session.get_inputs()[0].name: images.detach().cpu().numpy()}
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ProviderUnavailable("onnxruntime has no CUDA execution provider here")
    return lambda: session.run(None, feed)


def run_models(
    device: torch.device,
    models: Sequence[str],
    size: tuple[int, int] = (256, 256),
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    providers: Sequence[str] = ("eager", "fused", "compile", "onnxruntime"),
    num_classes: int | None = None,
    rounds: int = 10,
    progress: bool = True,
    budget_s: float = 5.0,
) -> list[BenchRow]:
    """Images/s and latency of each model x provider at ``size`` and ``batch`` (timing budget as `run_kernels`)."""
    rows: list[BenchRow] = []
    images = torch.randn(batch, 3, *size, device=device)
    shape = f"B{batch}-{size[0]}x{size[1]}"
    jobs = [(m, p) for m in models for p in providers]
    for name, provider in tqdm(jobs, desc="models", disable=not progress, leave=False):
        row = BenchRow("model", name, provider, shape, str(dtype).replace("torch.", ""))
        started = time.perf_counter()
        try:
            fn = model_provider(name, provider, device, images, num_classes)
            if dtype != torch.float32 and provider != "onnxruntime":
                inner = fn

                def fn(inner: Callable[[], Any] = inner) -> Any:  # noqa: F811 - autocast wrapper around the provider
                    with torch.autocast(device.type, dtype=dtype):
                        return inner()

            _timed_row(row, fn, device, rounds, budget_s)
            row.images_per_s = batch / (row.median_ms / 1e3)
        except ProviderUnavailable as why:
            row.note = str(why)
        except Exception as err:
            row.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        row.seconds = time.perf_counter() - started
        rows.append(row)
    _fill_speedups(rows, {(m, shape): "eager" for m in models})
    return rows


def run_stages(
    device: torch.device,
    models: Sequence[str],
    size: tuple[int, int] = (512, 512),
    batch: int = 1,
    num_classes: int | None = None,
    rounds: int = 10,
    progress: bool = True,
) -> list[BenchRow]:
    """Per-stage latency of models that define ``benchmark_stages(fused)`` (GSS: backbone, head, token argmax,
    decoder, palette inverse), on the reference path and on the fused path."""
    from ..registry import create_model

    rows: list[BenchRow] = []
    images = torch.randn(batch, 3, *size, device=device)
    shape = f"B{batch}-{size[0]}x{size[1]}"
    for name in tqdm(models, desc="stages", disable=not progress, leave=False):
        model = create_model(name, **({} if num_classes is None else {"num_classes": num_classes})).eval().to(device)
        if not hasattr(model, "benchmark_stages"):
            rows.append(BenchRow("stage", name, "-", shape, "float32", note="model defines no benchmark_stages"))
            continue
        for provider, fused in (("reference", False), ("fused", True)):
            x: Any = images
            with torch.inference_mode():
                for stage, step in model.benchmark_stages(fused):
                    row = BenchRow("stage", f"{name}/{stage}", provider, shape, "float32")
                    rows.append(_timed_row(row, lambda step=step, x=x: step(x), device, rounds))
                    x = step(x)
    _fill_speedups(rows, {(r.name, shape): "reference" for r in rows})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _sig(value: float | None) -> str:
    """Three significant digits, whatever the magnitude (CPU figures are orders below GPU ones)."""
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def format_table(rows: Sequence[BenchRow], env: dict[str, Any]) -> str:
    """A plain-text table with the environment header; skipped providers are listed with their reason."""
    header = (
        f"device: {env['device']} ({env['device_type']})  torch {env['torch']}  triton {env.get('triton')}  "
        f"cuda {env.get('cuda')}  onnxruntime {env.get('onnxruntime')}  fastseg {env['fastseg']} "
        f"({env.get('fastseg_commit') or 'no git'})"
    )
    if env["device_type"] == "cpu":  # CPU timings depend on these; a shared machine must be read with them
        header += f"\nCPU threads {env.get('cpu_threads')}  OMP_WAIT_POLICY {env.get('omp_wait_policy')}"
    cols = [
        "kind",
        "name",
        "provider",
        "shape",
        "dtype",
        "median ms",
        "p20-p80 ms",
        "GB/s",
        "TFLOP/s",
        "% roof",
        "speed-up",
        "img/s",
    ]
    lines = []
    for r in rows:
        if not r.ok:
            continue
        lines.append(
            [
                r.kind,
                r.name,
                r.provider,
                r.shape,
                r.dtype,
                _fmt(r.median_ms, ".3f"),
                f"{_fmt(r.p20_ms, '.3f')}-{_fmt(r.p80_ms, '.3f')}",
                _sig(r.gbps),
                _sig(r.tflops),
                _sig(None if r.roofline is None else 100 * r.roofline),
                _fmt(r.speedup, ".2f") + ("x" if r.speedup else ""),
                _fmt(r.images_per_s, ".1f"),
            ]
        )
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
    out = [header, "", "  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines]
    skipped = [r for r in rows if not r.ok]
    if skipped:
        out += ["", "not run:"]
        reasons: dict[str, list[str]] = {}
        for r in skipped:
            reasons.setdefault(r.note, []).append(f"{r.name}[{r.provider}]")
        for note, names in reasons.items():
            listing = ", ".join(sorted(set(names))[:6]) + (
                f" (+{len(set(names)) - 6} more)" if len(set(names)) > 6 else ""
            )
            out.append(f"  {note}: {listing}")
    return "\n".join(out)


def save_json(
    rows: Sequence[BenchRow],
    env: dict[str, Any],
    path: str | Path,
    args: dict[str, Any],
    seconds: dict[str, float] | None = None,
) -> None:
    """Rows, environment (threads and OpenMP wait policy included) and arguments; ``seconds``: wall time per phase."""
    data = {"environment": env, "arguments": args, "rows": [dataclasses.asdict(r) for r in rows]}
    if seconds is not None:
        data["seconds"] = seconds
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=str))


def save_plot(rows: Sequence[BenchRow], env: dict[str, Any], path: str | Path) -> None:
    """One panel per op: time per call for each shape (ordered by the bytes the op must move), a line per provider,
    and the device's bandwidth roofline (min bytes / peak GB/s) as a dashed line; models get one bar panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.ok]
    if not done:
        raise ValueError("nothing was measured, so there is nothing to plot")
    kernels = [r for r in done if r.kind == "kernel" and r.gbps]
    models = [r for r in done if r.kind != "kernel" or not r.gbps]
    ops = sorted({r.name for r in kernels})
    panels = len(ops) + (1 if models else 0)
    cols = min(3, panels)
    nrows = math.ceil(panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    providers = sorted({r.provider for r in done})
    palette = plt.get_cmap("tab10").colors
    colour_of = {p: palette[i % len(palette)] for i, p in enumerate(providers)}
    peak_gbps = (env.get("peak") or {}).get("hbm_gbps")
    for ax, op in zip(axes.flat, ops):
        sub = [r for r in kernels if r.name == op]
        # Shapes in order of the bytes they must move (GB/s x ms = MB; one value per shape, whatever the provider).
        mb_of: dict[str, float] = {}
        for r in sub:
            mb_of.setdefault(r.shape, r.gbps * r.median_ms)
        shapes = sorted(mb_of, key=mb_of.get)
        xs = {shape: i for i, shape in enumerate(shapes)}
        for provider in sorted({r.provider for r in sub}):
            pts = sorted((xs[r.shape], r.median_ms) for r in sub if r.provider == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=provider, color=colour_of[provider])
        if peak_gbps:
            ax.plot(
                range(len(shapes)),
                [mb_of[sh] / peak_gbps for sh in shapes],
                "k--",
                lw=1,
                marker="_",
                ms=18,
                label=f"roofline ({peak_gbps:.0f} GB/s)",
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)), [f"{sh}\n{mb_of[sh]:.0f} MB" for sh in shapes], fontsize=5, rotation=15)
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        ax.set_title(op, fontsize=9)
        ax.set_ylabel("median ms per call (log)", fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", lw=0.3)
    if models:
        ax = axes.flat[len(ops)]
        labels = [f"{r.name} [{r.provider}]" for r in models]
        values = [r.images_per_s or 1e3 / r.median_ms for r in models]
        ax.barh(range(len(models)), values, color=[colour_of[r.provider] for r in models])
        ax.set_yticks(range(len(models)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("images / s (or calls / s)", fontsize=8)
        ax.set_title("models and stages", fontsize=9)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(f"fastseg bench on {env['device']} - torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device: torch.device) -> dict[str, Any]:
    env = environment_info(device)
    peak = peak_for(device)
    if peak is not None:
        env["peak"] = dataclasses.asdict(peak)
    return env
