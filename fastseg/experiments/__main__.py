"""``python -m fastseg.experiments list | run NAME | forget NAME --variants ... --reason ... | merge NAME FILE |
render [--check]``."""

from __future__ import annotations

import argparse
import os
import sys

from .core import RESULTS_DIR, derive, forget_runs, load_record, merge_records, new_record, run_experiment
from .declarations import EXPERIMENTS
from .recipes import run_job
from .render import render_readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastseg.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="declared experiments and how many of their jobs are done")
    run = sub.add_parser("run", help="run the missing (variant, seed) jobs of one experiment, resumably")
    run.add_argument("name", choices=sorted(EXPERIMENTS))
    run.add_argument("--variants", nargs="+", help="only these variants (default: all)")
    run.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: the declared ones)")
    run.add_argument("--max-minutes", type=float, help="start no new job after this much wall-clock time")
    run.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    run.add_argument("--results-dir", default=str(RESULTS_DIR))
    forget = sub.add_parser("forget", help="drop finished runs that a code change made stale (they run again)")
    forget.add_argument("name", choices=sorted(EXPERIMENTS))
    forget.add_argument("--variants", nargs="+", required=True)
    forget.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: every finished seed)")
    forget.add_argument("--reason", required=True, help="what made them stale (kept in the JSON)")
    forget.add_argument("--results-dir", default=str(RESULTS_DIR))
    merge = sub.add_parser("merge", help="take in the runs another copy of an experiment's JSON has and this lacks")
    merge.add_argument("name", choices=sorted(EXPERIMENTS))
    merge.add_argument("file", help="the other JSON (e.g. written by `run --seeds K --results-dir DIR` elsewhere)")
    merge.add_argument("--results-dir", default=str(RESULTS_DIR))
    render = sub.add_parser("render", help="re-render README.md's result blocks from the committed JSON")
    render.add_argument("--check", action="store_true", help="fail (exit 1) if README differs; write nothing")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, experiment in EXPERIMENTS.items():
            # Runs reused from another experiment's record count as done (derived in memory, nothing written).
            record = derive(experiment, load_record(experiment.result_path()) or new_record(experiment))
            total = len(experiment.variants) * len(experiment.seeds)
            done = len({(r["variant"], r["seed"]) for r in record["runs"] + record.get("reused_runs", [])})
            b = experiment.budget
            print(f"{name:20s} {done:3d}/{total} jobs done  {b.steps} steps x {b.batch_size}  {experiment.title}")
        return 0
    if args.command == "run":
        # Spinning OpenMP threads make a shared 2-core machine crawl; must be set before the first parallel region.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        run_experiment(
            EXPERIMENTS[args.name],
            run_job,
            results_dir=args.results_dir,
            variants=args.variants,
            seeds=args.seeds,
            max_minutes=args.max_minutes,
            threads=args.threads,
        )
        return 0
    if args.command == "forget":
        forget_runs(EXPERIMENTS[args.name], args.variants, args.reason, args.seeds, results_dir=args.results_dir)
        return 0
    if args.command == "merge":
        merge_records(EXPERIMENTS[args.name], args.file, results_dir=args.results_dir)
        return 0
    up_to_date = render_readme(".", check=args.check)
    if args.check and not up_to_date:
        print(
            "README.md differs from the tables rendered from benchmarks/results: run "
            "`python -m fastseg.experiments render`",
            file=sys.stderr,
        )
        return 1
    print("README.md is up to date" if up_to_date else "README.md re-rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
