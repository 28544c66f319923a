"""Declared comparisons -> JSON under benchmarks/results/experiments -> README tables.

    python -m fastseg.experiments list
    python -m fastseg.experiments run ecenet_vs_fpn [--seeds 0 1] [--variants ...] [--max-minutes 60]
    python -m fastseg.experiments render [--check]

See `core` (running, resuming, claims), `declarations` (what is compared, at which budget), `recipes` (how one job
trains) and `render` (README blocks).
"""

from .core import Budget, Claim, Experiment, Report, Variant, judge_claim, run_experiment, summarise
from .declarations import EXPERIMENTS
from .render import render_readme

__all__ = [
    "EXPERIMENTS",
    "Budget",
    "Claim",
    "Experiment",
    "Report",
    "Variant",
    "judge_claim",
    "render_readme",
    "run_experiment",
    "summarise",
]
