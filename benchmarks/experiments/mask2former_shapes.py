"""Mask2Former on the shapes world at its default CLI budget, and the semantic FPN baseline at the same budget.

Runs the `fastseg` commands themselves (so the recorded commands are exactly what a user types; the two trainings
side by side, each single-threaded), records each one's wall time and CPU seconds, and
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
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path("benchmarks/results/experiments/mask2former_shapes.json")


def _start(cmd: list[str]) -> tuple[subprocess.Popen, float, str]:
    print("$ " + shlex.join(cmd), flush=True)
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - read back in _finish
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return proc, time.perf_counter(), log.name


def _finish_all(jobs: dict[str, tuple[subprocess.Popen, float, str]]) -> dict[str, dict]:
    """Wait for the commands in whatever order they end; per command its wall time and its own CPU seconds (user +
    system, from wait4's rusage: what one free core would need -- wall time on a shared machine is inflated by
    everything else that runs)."""
    by_pid = {job[0].pid: name for name, job in jobs.items()}
    done: dict[str, dict] = {}
    while by_pid:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in by_pid:
            continue
        name = by_pid.pop(pid)
        proc, start, log = jobs[name]
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        output = Path(log).read_text()
        Path(log).unlink()
        cmd = shlex.join(proc.args)
        if proc.returncode != 0:
            raise SystemExit(f"command failed ({proc.returncode}): {cmd}\n{output[-4000:]}")
        cpu = usage.ru_utime + usage.ru_stime
        print(f"  done: {cmd} ({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
        done[name] = {"command": cmd, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "stdout_tail": output[-3000:]}
    return done


def _finish(started: tuple[subprocess.Popen, float, str]) -> dict:
    return _finish_all({"job": started})["job"]


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
    return {
        "fastseg": fastseg.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "scipy": scipy.__version__,
        "pycocotools": coco,
        "python": platform.python_version(),
    }


def _machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": 1,
        "device": "cpu",
        "note": "shared 2-core machine (other agents ran at the same time): wall times are inflated",
    }


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
        "command": shlex.join(["python", *sys.argv]),
        "budget": budget,
        "versions": _versions(),
        "machine": _machine(),
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(record, indent=2, default=float) + "\n")

    m2f_dir, m2f_json = runs / "m2f", runs / "m2f_eval.json"
    fpn_dir, fpn_json = runs / "fpn", runs / "fpn_eval.json"
    # The two trainings run side by side (each single-threaded), then the evaluations.
    jobs = {
        "mask2former_resnet18": _start(
            [*fastseg_cmd, "train", "mask2former_resnet18", "--task", "panoptic", "--out", str(m2f_dir)]
        )
    }
    if not args.skip_fpn:
        jobs["fpn_resnet18"] = _start(
            [
                *fastseg_cmd,
                "train",
                "fpn_resnet18",
                "--steps",
                str(budget["steps"]),
                "--batch-size",
                str(budget["batch_size"]),
                "--out",
                str(fpn_dir),
            ]
        )
    trained = _finish_all(jobs)
    ev = _finish(
        _start(
            [
                *fastseg_cmd,
                "eval",
                "mask2former_resnet18",
                "--checkpoint",
                str(m2f_dir / "model.safetensors"),
                "--task",
                "semantic,panoptic,instance",
                "--json",
                str(m2f_json),
            ]
        )
    )
    metrics = json.loads(m2f_json.read_text())
    train = trained["mask2former_resnet18"]
    record["runs"]["mask2former_resnet18"] = {
        "train": train,
        "eval": ev,
        "metrics": metrics,
        "summary": {
            "PQ": metrics["panoptic"]["PQ"],
            "SQ": metrics["panoptic"]["SQ"],
            "RQ": metrics["panoptic"]["RQ"],
            "PQ_things": metrics["panoptic"]["things"]["PQ"],
            "PQ_stuff": metrics["panoptic"]["stuff"]["PQ"],
            "mask_AP": metrics["instance"]["AP"],
            "AP50": metrics["instance"]["AP50"],
            "AP75": metrics["instance"]["AP75"],
            "mIoU": metrics["semantic"]["mIoU"],
            "train_wall_s": train["wall_s"],
            "train_cpu_s": train["cpu_s"],
        },
    }
    save()
    if not args.skip_fpn:
        ev = _finish(
            _start(
                [
                    *fastseg_cmd,
                    "eval",
                    "fpn_resnet18",
                    "--checkpoint",
                    str(fpn_dir / "model.safetensors"),
                    "--json",
                    str(fpn_json),
                ]
            )
        )
        metrics = json.loads(fpn_json.read_text())
        train = trained["fpn_resnet18"]
        record["runs"]["fpn_resnet18"] = {
            "train": train,
            "eval": ev,
            "metrics": metrics,
            "summary": {"mIoU": metrics["mIoU"], "train_wall_s": train["wall_s"], "train_cpu_s": train["cpu_s"]},
        }
        save()
    for name, run in record["runs"].items():
        print(name, json.dumps(run["summary"]))


if __name__ == "__main__":
    main()
