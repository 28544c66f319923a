"""Per-stage inference time of one GSS-FF forward, reference ops vs fused ops, into benchmarks/results/gss_stages.json.

The stages are ``GSSSegmenter.benchmark_stages``: backbone, head, token argmax, decoder, palette inverse, each fed the
previous stage's output. The reference path runs dense token logits + argmax, one-hot + 1x1 conv into the decoder and
a broadcast palette argmin; the fused path runs ``argmax_matmul``, the code gather and ``vq_nearest`` (on a CPU their
torch reference kernels: the point of the fused ops is the GPU kernel). Each stage is timed best-of-``--repeats``
after one warm-up call. The weights are random unless ``--checkpoint`` is given (timing does not depend on them; the
record says which). README renders the table from the JSON (``<!-- render: gss-stages gss_stages -->``).

    python benchmarks/gss_stages.py --threads 1            # what produced the committed record
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastseg.checkpoint import atomic_write
from fastseg.experiments.core import machine_info, versions
from fastseg.registry import create_model

OUT = Path(__file__).resolve().parent / "results" / "gss_stages.json"


def _best_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000, out


@torch.no_grad()
def stage_times(model: torch.nn.Module, size: int, repeats: int) -> dict[str, Any]:
    """``{"reference": {stage_ms...}, "fused": {...}, "identical_class_maps": bool}`` for one (1, 3, size, size)."""
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows: dict[str, Any] = {}
    maps = {}
    for path, fused in (("reference", False), ("fused", True)):
        row, value = {}, x
        for stage, fn in model.benchmark_stages(fused):
            ms, value = _best_ms(lambda fn=fn, v=value: fn(v), repeats)
            row[f"{stage}_ms"] = round(ms, 1)
        row["total_ms"] = round(sum(row.values()), 1)
        rows[path], maps[path] = row, value
    rows["identical_class_maps"] = bool(torch.equal(maps["reference"], maps["fused"]))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gss_ff_resnet18")
    parser.add_argument("--checkpoint", help="trained weights (default: random initialisation, seed 0)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if args.size < 32 or args.size % 32:
        raise ValueError(f"--size must be a positive multiple of 32, got {args.size}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, checkpoint_path=args.checkpoint)
    record = {
        "command": shlex.join(["python", "benchmarks/gss_stages.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model,
        "weights": args.checkpoint or "random initialisation (torch.manual_seed(0))",
        "size": args.size,
        "batch": 1,
        "repeats": args.repeats,
        "machine": machine_info(torch.get_num_threads()),
        "versions": versions(),
        "note": "CPU: the fused ops run their torch reference kernels here (Triton needs a GPU)",
        "stages": stage_times(model, args.size, args.repeats),
    }
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(args.out, lambda f: f.write(text.encode()))
    print(json.dumps(record["stages"], indent=1))
    return record


if __name__ == "__main__":
    main()
