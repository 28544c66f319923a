"""fastseg's CPU ``vq_nearest`` against faiss-cpu's ``IndexFlatL2`` (k = 1), at the same thread count and under the
same OpenMP wait policy, each provider in its own fresh process.

Why processes: OpenMP reads ``OMP_WAIT_POLICY`` once, when its runtime starts, and torch and faiss-cpu each ship their
own runtime (two ``libgomp`` copies). In one process the threads of the runtime that ran last keep spinning (forever
under ``ACTIVE``) while the other one works, so whichever provider runs second is slowed down. Here every (policy,
provider) pair runs in a child process that sets the policy and the thread count before anything starts, warms up,
then times ``--rounds`` calls; the order of the providers is reversed on every other repeat, so a drift in the
machine's load hits them alike. Every provider's indices and distances are then checked against the chunked
reference (`vq_nearest_ref`) with the bench's `compare_outputs`, like every provider of ``fastseg bench``.

Providers: ``blocked`` (``vq_nearest(impl="auto")`` on CPU tensors: fastseg's CPU path), ``faiss`` and ``torch`` (the
chunked reference, for context). Policies: ``PASSIVE`` (threads sleep between regions; what ``fastseg bench`` sets),
``default`` (the variable unset: libgomp spins a while, then sleeps) and ``ACTIVE`` (threads spin until the next
region). The JSON records the command, the environment and the 1-minute load average before and after: a shared
machine inflates every figure, spinning ones most.

    python benchmarks/vq_vs_faiss.py --out benchmarks/results/cpu-x86_64/vq_vs_faiss.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROVIDERS = ("blocked", "faiss", "torch")
POLICIES = ("PASSIVE", "default", "ACTIVE")


def _inputs(n: int, k: int, d: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g), torch.rand(k, d, generator=g)


def _child(args: argparse.Namespace) -> None:
    """Time one provider in this process (policy and threads came through the environment) and save its output."""
    import numpy as np
    import torch

    from fastseg.kernels import vq_nearest, vq_nearest_ref

    torch.set_num_threads(args.threads)
    z, codebook = _inputs(args.n, args.k, args.d, args.seed)
    if args.child == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
        index = faiss.IndexFlatL2(args.d)
        index.add(codebook.numpy())
        queries = z.numpy()

        def fn():
            dist, idx = index.search(queries, 1)
            return idx[:, 0], dist[:, 0]
    else:

        def fn():
            with torch.no_grad():
                if args.child == "blocked":
                    out = vq_nearest(z, codebook, impl="auto")
                else:
                    out = vq_nearest_ref(z, codebook)
            return out[0].numpy(), out[1].numpy()

    for _ in range(args.warmup):
        out = fn()
    wall, cpu = [], []
    for _ in range(args.rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    np.savez(args.save, index=out[0].astype(np.int64), sqdist=out[1].astype(np.float32))
    print(json.dumps({"wall_s": wall, "cpu_s": cpu}))


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))] * 1e3

    return {"median_ms": statistics.median(samples) * 1e3, "p20_ms": q(0.2), "p80_ms": q(0.8), "min_ms": q(0.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="threads of both runtimes (torch and faiss)")
    p.add_argument("--rounds", type=int, default=10, help="timed calls per process")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="processes per (policy, provider), order alternated")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, from {POLICIES}")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {PROVIDERS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the record as JSON")
    p.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    policies = [x for x in args.policies.split(",") if x]
    providers = [x for x in args.providers.split(",") if x]
    for name, given, known in (("policy", policies, POLICIES), ("provider", providers, PROVIDERS)):
        unknown = sorted(set(given) - set(known))
        if unknown or not given:
            raise SystemExit(f"unknown or no {name} {unknown}; choose from {known}")

    import numpy as np
    import torch

    from fastseg.bench.core import compare_outputs
    from fastseg.bench.env import environment_info
    from fastseg.kernels import vq_nearest_ref

    load_before = os.getloadavg()
    ref = vq_nearest_ref(*_inputs(args.n, args.k, args.d, args.seed))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vq-vs-faiss-") as tmp:
        for policy in policies:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            samples: dict[str, dict[str, list[float]]] = {pr: {"wall_s": [], "cpu_s": []} for pr in providers}
            checks: dict[str, str | None] = {}
            for rep in range(args.repeats):
                for provider in providers if rep % 2 == 0 else providers[::-1]:
                    save = str(Path(tmp) / f"{policy}-{provider}.npz")
                    cmd = [sys.executable, __file__, "--child", provider, "--save", save]
                    cmd += [f"--{a}={getattr(args, a)}" for a in ("n", "k", "d", "threads", "rounds", "warmup", "seed")]
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise SystemExit(f"{policy}/{provider} failed:\n{done.stderr[-2000:]}")
                    timing = json.loads(done.stdout.strip().splitlines()[-1])
                    for key in ("wall_s", "cpu_s"):
                        samples[provider][key] += timing[key]
                    saved = np.load(save)
                    out = (torch.from_numpy(saved["index"]), torch.from_numpy(saved["sqdist"]))
                    checks[provider] = compare_outputs(out, ref, torch.float32)
            results[policy] = {
                pr: {
                    "wall": _summary(samples[pr]["wall_s"]),
                    "cpu_ms_median": statistics.median(samples[pr]["cpu_s"]) * 1e3,
                    "rounds": len(samples[pr]["wall_s"]),
                    "agrees_with_reference": checks[pr] is None,
                    "mismatch": checks[pr],
                }
                for pr in providers
            }
            if "blocked" in providers and "faiss" in providers:
                ratio = results[policy]["blocked"]["wall"]["median_ms"] / results[policy]["faiss"]["wall"]["median_ms"]
                results[policy]["blocked_over_faiss"] = ratio
    load_after = os.getloadavg()

    print(f"vq_nearest N={args.n} K={args.k} D={args.d} fp32, {args.threads} threads; load {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f}")  # fmt: skip
    print(f"{'policy':8s}  {'provider':8s}  {'median ms':>9s}  {'p20-p80 ms':>15s}  {'cpu ms':>7s}  check")
    for policy, by_provider in results.items():
        for provider in providers:
            r = by_provider[provider]
            w = r["wall"]
            print(f"{policy:8s}  {provider:8s}  {w['median_ms']:9.1f}  {w['p20_ms']:7.1f}-{w['p80_ms']:7.1f}  "
                  f"{r['cpu_ms_median']:7.1f}  {'ok' if r['agrees_with_reference'] else r['mismatch']}")  # fmt: skip
        if "blocked_over_faiss" in by_provider:
            print(f"{policy:8s}  blocked / faiss = {by_provider['blocked_over_faiss']:.2f}x")
    if args.out:
        record = {
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]]),
            "config": {k: v for k, v in vars(args).items() if k not in ("child", "save", "out")},
            "environment": environment_info(torch.device("cpu")),
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
            "results": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2, default=str))
        print(f"JSON: {args.out}")
    ok = all(r[pr]["agrees_with_reference"] for r in results.values() for pr in providers)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
