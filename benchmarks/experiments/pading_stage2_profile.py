"""Profile PADing's stage-2 iteration on the head alone (the frozen segmenter's forward is Mask2Former's cost):
wall time per step and per part, and the number of operator calls (kernel launches on a GPU) per step, at the
official COCO panoptic sizes (width 256, M = 128 matched queries, 14 unseen of 133 classes, 400 primitives) and at
the shapes-world CPU sizes (width 64, M = 32, 3 unseen of 13).

    python benchmarks/experiments/pading_stage2_profile.py --out benchmarks/results/experiments/pading_stage2_profile.json

Timings on a shared 2-core CPU are inflated by other processes; operator counts are exact.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fastseg.models.pading import PADingHead

FUSED_OPTIMIZERS = True  # as `train_stage2` builds them; --unfused measures the per-parameter loop

CONFIGS = {
    "coco_panoptic": dict(k=133, unseen=14, dim=256, d_s=512, m=128, queries=1200),
    "shapes_cpu": dict(k=13, unseen=3, dim=64, d_s=16, m=32, queries=128),
}


def build(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    k, nu = cfg["k"], cfg["unseen"]
    head = PADingHead(torch.randn(k, cfg["d_s"]), list(range(k - nu)), list(range(k - nu, k)), dim=cfg["dim"]).train()
    real = torch.nn.functional.layer_norm(torch.randn(cfg["m"], cfg["dim"]), (cfg["dim"],))
    labels = torch.randint(0, k - nu, (cfg["m"],))
    queries = torch.nn.functional.layer_norm(torch.randn(cfg["queries"], cfg["dim"]), (cfg["dim"],))
    qlabels = torch.full((cfg["queries"],), k)
    qlabels[: cfg["m"]] = labels
    fused = {"fused": True} if FUSED_OPTIMIZERS else {}
    opt_g = torch.optim.Adam(head.generator_parameters(), lr=5e-4, **fused)
    opt_c = torch.optim.SGD(head.new_fc.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, **fused)
    return head, real, labels, queries, qlabels, opt_g, opt_c


def step(head, real, labels, queries, qlabels, opt_g, opt_c, parts: dict | None = None) -> None:
    t0 = time.perf_counter()
    losses = head.generator_losses(real, labels)
    t1 = time.perf_counter()
    opt_g.zero_grad(set_to_none=True)
    losses["loss"].backward()
    t2 = time.perf_counter()
    opt_g.step()
    t3 = time.perf_counter()
    cls = head.classifier_loss(queries, qlabels)
    opt_c.zero_grad(set_to_none=True)
    cls["loss"].backward()
    opt_c.step()
    t4 = time.perf_counter()
    if parts is not None:
        for name, dt in (("G forward", t1 - t0), ("G backward", t2 - t1), ("G Adam", t3 - t2), ("D step", t4 - t3)):
            parts[name] = parts.get(name, 0.0) + dt


def profile_config(name: str, cfg: dict, rounds: int) -> dict:
    state = build(cfg)
    for _ in range(3):
        step(*state)
    parts: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(rounds):
        step(*state, parts=parts)
    per_step = (time.perf_counter() - start) / rounds
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(*state)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    # Top-level aten calls only (an op's children are its implementation, not extra launches).
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    counts = Counter(e.name for e in top)
    # Forward-only split: which module the ops of step G's forward come from.
    head, real, labels, *_ = state
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as fwd:
        with torch.profiler.record_function("generator"):
            a = head.projection(head.class_embeddings)
            fake = head.generate(torch.cat([a[labels], a[head.unseen_ids]]))
        with torch.profiler.record_function("mmd"):
            from fastseg.models.pading import mmd_loss

            mmd_loss(fake[: len(labels)], real)
        with torch.profiler.record_function("structure"):
            head.structure_losses(fake[: len(labels)], fake[len(labels) :], a, labels)
    by_region = {}
    for region in ("generator", "mmd", "structure"):
        ops = [e for e in fwd.events() if e.name.startswith("aten::") and _under(e, region)]
        by_region[region] = {
            "ops": len([e for e in ops if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]),
            "ms": sum(e.cpu_time_total for e in fwd.events() if e.name == region) / 1e3,
        }
    return {
        "config": cfg,
        "ms_per_step": per_step * 1e3,
        "ms_per_part": {k: v / rounds * 1e3 for k, v in parts.items()},
        "aten_ops_per_step": sum(counts.values()),
        "top_ops": counts.most_common(12),
        "forward_by_region": by_region,
    }


def _under(event, region: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == region:
            return True
        parent = parent.cpu_parent
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--unfused", action="store_true", help="per-parameter optimiser loops (the default PyTorch)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    global FUSED_OPTIMIZERS
    FUSED_OPTIMIZERS = not args.unfused
    torch.set_num_threads(1)
    results = {name: profile_config(name, CONFIGS[name], args.rounds) for name in args.configs.split(",")}
    record = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "note": "shared 2-core CPU: wall times inflated",
        "results": results,
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
