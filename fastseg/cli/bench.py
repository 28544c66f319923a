"""``fastseg bench``: kernels and models on this device; a table, JSON and a plot."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .common import parse_device, parse_size

__all__ = ["add_bench_command", "cmd_bench"]


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..bench.core import kernel_families
    from ..bench.runner import environment, format_table, run_kernels, run_models, run_stages, save_json, save_plot
    from ..registry import list_models

    if args.static:  # compile reports for NVIDIA targets + traffic model; no timing, no GPU needed
        from ..bench.static import problems, run_static

        report = run_static(full=args.full)
        return 1 if any(problems(r) for r in report["rows"] if r["shipped"]) else 0
    device = parse_device(args.device)
    as_command = os.path.basename(sys.argv[0]) in ("fastseg", "__main__.py")  # not when called in-process (tests)
    if (
        device.type == "cpu"
        and as_command
        and os.environ.get("OMP_WAIT_POLICY") is None
        and not os.environ.get("FASTSEG_NO_REEXEC")
    ):
        # OpenMP reads its wait policy once, when torch loads: spinning threads made every case 10-20x slower beside
        # one other busy process. Run again with passive waiting (and say so in the table header).
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["FASTSEG_NO_REEXEC"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "fastseg.cli", *sys.argv[1:]])
    if device.type == "cpu":
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    phases: dict[str, float] = {}  # where the run's time goes, printed at the end and kept in the JSON
    started = time.perf_counter()
    env = environment(device)
    print(f"fastseg bench on {env['device']} ({device.type}); torch {env['torch']}, triton {env.get('triton')}")
    if device.type != "cuda":
        print("note: no CUDA GPU here, so the Triton providers are not timed (they need a GPU); CPU providers run.")
    rows = []
    families = None if args.kernels == "all" else [f for f in args.kernels.split(",") if f and f != "none"]
    if args.kernels != "none" and (families is None or families):
        phase = time.perf_counter()
        rows += run_kernels(
            device, families or kernel_families(), quick=not args.full, rounds=args.rounds, budget_s=args.budget
        )
        phases["kernels"] = time.perf_counter() - phase
    if args.models != "none":
        models = list_models(args.models.split(",")) if args.models != "default" else args.default_models
        if not models:
            raise SystemExit(f"--models {args.models!r} matches no registered model")
        providers = args.providers.split(",")
        phase = time.perf_counter()
        rows += run_models(
            device,
            models,
            size=args.size,
            batch=args.batch,
            dtype=dtype,
            providers=providers,
            rounds=args.rounds,
            budget_s=args.budget,
        )
        phases["models"] = time.perf_counter() - phase
        if args.stages:
            phase = time.perf_counter()
            rows += run_stages(device, models, size=args.size, batch=args.batch, rounds=args.rounds)
            phases["stages"] = time.perf_counter() - phase
    print(format_table(rows, env))
    arguments = {k: v for k, v in vars(args).items() if k != "func"}
    if device.type != "cuda" and args.static_after:
        # Without a GPU, show what the kernels would do on one: the static report (cached compiles) after the timings.
        from ..bench.static import run_static

        print()
        phase = time.perf_counter()
        run_static(full=False, out=None, table_targets=("sm_87", "sm_90"))
        phases["static"] = time.perf_counter() - phase
    phases["total"] = time.perf_counter() - started
    print()
    print(_time_summary(rows, phases))
    if args.json:
        save_json(rows, env, args.json, arguments, seconds=phases)
        print(f"JSON: {args.json}")
    if args.plot:
        try:
            save_plot(rows, env, args.plot)
            print(f"plot: {args.plot}")
        except ValueError as err:
            print(f"no plot: {err}", file=sys.stderr)
    return 0 if any(r.ok for r in rows) else 1


def _time_summary(rows: list, phases: dict[str, float], slowest: int = 5) -> str:
    """Where the run's time went: each phase, then the slowest jobs (set-up such as compiling or exporting included)."""
    line = "time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
    jobs = sorted((r for r in rows if r.seconds is not None), key=lambda r: -r.seconds)[:slowest]
    if jobs:
        line += "\nslowest jobs: " + ", ".join(f"{r.name}[{r.provider}] {r.seconds:.1f} s" for r in jobs)
    return line


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``fastseg`` command's sub-parsers."""
    p = sub.add_parser("bench", help="benchmark kernels and models on this device; table, JSON, plot")
    p.add_argument("--kernels", default="all", help="kernel families, comma-separated, 'all' or 'none'")
    p.add_argument(
        "--models",
        default="default",
        help="model name patterns, comma-separated ('default': a small set; 'none' to skip)",
    )
    p.add_argument("--providers", default="eager,fused,compile,onnxruntime", help="model providers")
    p.add_argument("--size", type=parse_size, default=(256, 256), metavar="H[,W]", help="model input size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="model precision (autocast)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per case (after warm-up)")
    p.add_argument(
        "--budget",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time per case: warm-up stops after half of it, timed rounds after all of it (at least 3 rounds)",
    )
    p.add_argument("--full", action="store_true", help="all kernel shapes, not only the quick set")
    p.add_argument(
        "--stages",
        action="store_true",
        help="also time each inference stage, reference vs fused (models with stages, e.g. gss_*)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for the timed region (default: the cores this process may use)",
    )
    p.add_argument("--json", help="write rows and environment as JSON")
    p.add_argument("--plot", help="write a PNG plot (matplotlib)")
    p.add_argument(
        "--static",
        action="store_true",
        help="only the static GPU report: every Triton kernel compiled for sm_80/86/87/89/90 (registers, "
        "spills, shared memory, tensor cores, occupancy) and the traffic model; no GPU needed",
    )
    p.add_argument(
        "--no-static",
        dest="static_after",
        action="store_false",
        help="on a CPU-only machine, do not print the static report after the timings",
    )
    p.set_defaults(func=cmd_bench, default_models=["fpn_resnet18", "ecenet_resnet18"])
