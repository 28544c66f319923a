"""Mask2Former on the shapes world at its default CLI budget, and the semantic FPN baseline at the same budget.

Runs the `fastseg` commands themselves (so the recorded commands are exactly what a user types), times them, and
writes ``benchmarks/results/experiments/mask2former_shapes.json`` with the commands, the environment and every
metric the evaluations print:

    fastseg train mask2former_resnet18 --task panoptic --out RUN/m2f
    fastseg eval mask2former_resnet18 --checkpoint RUN/m2f/model.safetensors --task semantic,panoptic,instance \
        --json RUN/m2f_eval.json
    fastseg train fpn_resnet18 --steps 600 --batch-size 16 --out RUN/fpn      (the same budget, spelled out)
    fastseg eval fpn_resnet18 --checkpoint RUN/fpn/model.safetensors --json RUN/fpn_eval.json

Usage::

    python benchmarks/experiments/mask2former_shapes.py [--runs-dir runs/m2f_experiment] [--skip-fpn]

Torch runs single-threaded (``OMP_NUM_THREADS=1``, as ``scripts/`` and the shared-machine rules set it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("benchmarks/results/experiments/mask2former_shapes.json")


def _run(cmd: list[str]) -> dict:
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-4000:]}")
    print(f"  ({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
    # CPU seconds (user + system of the command) are what one free core would need; wall time on a shared machine
    # is inflated by everything else that runs.
    return {"command": shlex.join(cmd), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "stdout_tail": proc.stdout[-3000:]}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import scipy
    import timm
    import torch

    import fastseg

    try:
        coco = version("pycocotools")
    except PackageNotFoundError:
        coco = None
    return {"fastseg": fastseg.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "scipy": scipy.__version__, "pycocotools": coco, "python": platform.python_version()}


def _machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "threads": 1, "device": "cpu",
            "note": "shared 2-core machine (other agents ran at the same time): wall times are inflated"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs/m2f_experiment")
    parser.add_argument("--skip-fpn", action="store_true")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    # the console script as a user types it (falls back to the interpreter when it is not on PATH)
    fastseg_cmd = ["fastseg"] if shutil.which("fastseg") else [sys.executable, "-m", "fastseg.cli"]

    budget = {"steps": 600, "batch_size": 16}  # `fastseg train`'s defaults
    record: dict = {
        "what": "Mask2Former (ResNet-18, CPU-sized head, from scratch) on the shapes world at its default CLI budget: "
                "val PQ / SQ / RQ, mask AP, mIoU; the semantic FPN baseline's mIoU at the same steps and batch",
        "budget": budget, "versions": _versions(), "machine": _machine(), "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(record, indent=2, default=float) + "\n")

    m2f_dir, m2f_json = runs / "m2f", runs / "m2f_eval.json"
    train = _run([*fastseg_cmd, "train", "mask2former_resnet18", "--task", "panoptic", "--out", str(m2f_dir)])
    ev = _run([*fastseg_cmd, "eval", "mask2former_resnet18", "--checkpoint", str(m2f_dir / "model.safetensors"),
               "--task", "semantic,panoptic,instance", "--json", str(m2f_json)])
    metrics = json.loads(m2f_json.read_text())
    record["runs"]["mask2former_resnet18"] = {"train": train, "eval": ev, "metrics": metrics, "summary": {
        "PQ": metrics["panoptic"]["PQ"], "SQ": metrics["panoptic"]["SQ"], "RQ": metrics["panoptic"]["RQ"],
        "PQ_things": metrics["panoptic"]["things"]["PQ"], "PQ_stuff": metrics["panoptic"]["stuff"]["PQ"],
        "mask_AP": metrics["instance"]["AP"], "AP50": metrics["instance"]["AP50"], "AP75": metrics["instance"]["AP75"],
        "mIoU": metrics["semantic"]["mIoU"], "train_wall_s": train["wall_s"], "train_cpu_s": train["cpu_s"]}}
    save()
    if not args.skip_fpn:
        fpn_dir, fpn_json = runs / "fpn", runs / "fpn_eval.json"
        train = _run([*fastseg_cmd, "train", "fpn_resnet18", "--steps", str(budget["steps"]), "--batch-size",
                      str(budget["batch_size"]), "--out", str(fpn_dir)])
        ev = _run([*fastseg_cmd, "eval", "fpn_resnet18", "--checkpoint", str(fpn_dir / "model.safetensors"),
                   "--json", str(fpn_json)])
        metrics = json.loads(fpn_json.read_text())
        record["runs"]["fpn_resnet18"] = {"train": train, "eval": ev, "metrics": metrics,
                                          "summary": {"mIoU": metrics["mIoU"], "train_wall_s": train["wall_s"],
                                                      "train_cpu_s": train["cpu_s"]}}
        save()
    for name, run in record["runs"].items():
        print(name, json.dumps(run["summary"]))


if __name__ == "__main__":
    main()
