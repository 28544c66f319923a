"""Declared comparisons, run one job at a time, resumable, into one JSON per comparison.

An :class:`Experiment` names its variants, its budget (steps, batch, optimiser; the same for every variant), its
seeds and the claims it checks. :func:`run_experiment` runs every missing ``(variant, seed)`` job in order and
rewrites the JSON after each, so an interrupted sweep keeps what finished; a job interrupted halfway resumes from
its last training checkpoint (``runs/experiments/<name>/<variant>-seed<k>/``); such a run's ``wall_s`` times only
the call that finished it, from its ``resumed_from_step``. The JSON records every command that added to it, the
configuration, versions, the machine and every per-seed number, and the summary and claims derived from them
(recomputed from the runs, never edited by hand).

Same seed = same training images and data order for every variant, so differences between variants at one seed are
paired. A variant declared with ``from_experiment`` is not trained again: its runs are read from that experiment's
JSON (the same variant, budget and seeds, checked) each time the summary is derived, and every such run says where
it came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..bench.env import cpu_model
from ..checkpoint import atomic_write

RESULTS_DIR = Path("benchmarks/results/experiments")
RUNS_DIR = Path("runs/experiments")
FORMAT = "fastseg.experiments/1"


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every variant of one comparison trains with (equal budgets are the point)."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float | None = None
    val_length: int = 128
    eval_every: int = 0  # > 0 records a validation curve (mIoU vs step) for every run
    image_size: int = 64


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of a comparison: a registered model, its keyword arguments and the recipe that trains it."""

    name: str
    model: str
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: str = "supervised"  # a key of fastseg.experiments.recipes.RECIPES
    recipe_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""  # how tables name it; defaults to ``name``
    # Reuse the runs of the identically declared variant of this other experiment (same budget and seeds) instead of
    # training it again; read when the summary is derived, never run by this experiment.
    from_experiment: str | None = None


@dataclasses.dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse`` on ``metric`` by more than ``margin`` (paired by seed); a negative margin reads
    "is no more than -margin below" (e.g. ECENet >= FPN - 1 point is ``margin=-0.01``).

    ``metric`` defaults to the experiment's; a claim may name another number every run of both variants records
    (e.g. the pseudo-mask mIoU of a weakly supervised method). With ``lower_is_better`` the paired difference is
    ``worse - better`` (e.g. a leakage share)."""

    text: str
    better: str
    worse: str
    margin: float = 0.0
    metric: str | None = None  # default: the experiment's metric
    lower_is_better: bool = False  # the paired difference is then ``worse - better`` (e.g. a leakage share)


@dataclasses.dataclass(frozen=True)
class Report:
    """A figure stated rather than compared (e.g. a tokenizer's round-trip mIoU): ``metric`` of ``variant``'s runs,
    mean ± std over seeds."""

    text: str
    variant: str
    metric: str


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    variants: tuple[Variant, ...]
    budget: Budget
    seeds: tuple[int, ...] = (0, 1, 2)
    metric: str = "mIoU"
    claims: tuple[Claim, ...] = ()
    notes: str = ""
    extra_metrics: tuple[str, ...] = ()  # further per-run numbers summarised per variant (``summary_extra``)
    reports: tuple[Report, ...] = ()

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"experiment {self.name!r} has no variant {name!r}; it has {[v.name for v in self.variants]}")

    def result_path(self, results_dir: str | os.PathLike = RESULTS_DIR) -> Path:
        return Path(results_dir) / f"{self.name}.json"


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        # Other processes slow a 2-core machine a lot; the 1/5/15-minute load when the command started says how busy
        # it was (wall-clock figures of a busy machine are not speed measurements).
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    from ..version import __version__

    return {"fastseg": __version__, "torch": torch.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------------------------
# Summaries and claims: derived from the runs, never stored by hand
# ----------------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def summarise_metric(runs: Sequence[dict[str, Any]], variant: str, metric: str) -> dict[str, Any] | None:
    """``{n, mean, std, per_seed}`` of ``metric`` over ``variant``'s runs; missing or non-finite values (an AP of a
    class no image holds) are left out of the mean and kept as ``None`` per seed; ``None`` without any run."""
    by_seed: dict[int, Any] = {r["seed"]: r.get(metric) for r in runs if r["variant"] == variant}
    if not by_seed:
        return None
    finite = [v for v in by_seed.values() if _finite(v)]
    mean, std = _mean_std(finite) if finite else (None, None)
    return {
        "n": len(finite),
        "mean": mean,
        "std": std,
        "per_seed": {str(s): (by_seed[s] if _finite(by_seed[s]) else None) for s in sorted(by_seed)},
    }


def summarise(experiment: Experiment, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std and per-seed values of the experiment's metric for every variant with at least one run."""
    out: dict[str, Any] = {}
    for variant in experiment.variants:
        by_seed = {r["seed"]: r[experiment.metric] for r in runs if r["variant"] == variant.name}
        if by_seed:
            mean, std = _mean_std(list(by_seed.values()))
            out[variant.name] = {
                "n": len(by_seed),
                "mean": mean,
                "std": std,
                "per_seed": {str(s): by_seed[s] for s in sorted(by_seed)},
            }
    return out


def judge_claim(claim: Claim, runs: Sequence[dict[str, Any]], metric: str, seeds: Sequence[int]) -> dict[str, Any]:
    """Paired differences ``better - worse`` per seed and a verdict.

    Verdicts: ``"holds"`` (mean difference above the margin and every seed's too), ``"holds on average"`` (mean above,
    some seed not), ``"does not hold"``, ``"incomplete"`` (fewer seeds than declared have both runs).
    """
    metric = claim.metric or metric
    sign = -1.0 if claim.lower_is_better else 1.0
    value = {(r["variant"], r["seed"]): r[metric] for r in runs if _finite(r.get(metric))}
    diffs = {
        s: sign * (value[(claim.better, s)] - value[(claim.worse, s)])
        for s in seeds
        if (claim.better, s) in value and (claim.worse, s) in value
    }
    result: dict[str, Any] = {
        "text": claim.text,
        "better": claim.better,
        "worse": claim.worse,
        "margin": claim.margin,
        **({"metric": claim.metric} if claim.metric else {}),
        "paired_differences": {str(s): d for s, d in sorted(diffs.items())},
    }
    if claim.lower_is_better:
        result["lower_is_better"] = True
    if len(diffs) < len(seeds):
        result["verdict"] = "incomplete"
        return result
    mean, std = _mean_std(list(diffs.values()))
    result.update(mean_difference=mean, std_difference=std)
    if mean > claim.margin:
        result["verdict"] = "holds" if all(d > claim.margin for d in diffs.values()) else "holds on average"
    else:
        result["verdict"] = "does not hold"
    return result


def reused_runs(experiment: Experiment, results_dir: str | os.PathLike = RESULTS_DIR) -> list[dict[str, Any]]:
    """The runs of every ``from_experiment`` variant, read from that experiment's JSON, each marked with its source.

    The source must declare the same variant (model, its arguments, recipe and recipe arguments) at the same budget,
    or the numbers would not be comparable: a mismatch is a ``ValueError``. A source without a JSON yet gives no runs.
    """
    out: list[dict[str, Any]] = []
    for variant in experiment.variants:
        if variant.from_experiment is None:
            continue
        path = Path(results_dir) / f"{variant.from_experiment}.json"
        source = load_record(path)
        if not source:
            continue
        where = f"{variant.from_experiment!r} ({path})"
        if source["config"]["budget"] != dataclasses.asdict(experiment.budget):
            raise ValueError(
                f"{experiment.name}: variant {variant.name!r} reuses the runs of {where}, which trained at another "
                f"budget ({source['config']['budget']} vs {dataclasses.asdict(experiment.budget)})"
            )
        declared = {v["name"]: v for v in source["config"]["variants"]}
        if variant.name not in declared:
            raise ValueError(f"{experiment.name}: {where} has no variant {variant.name!r} to reuse")
        same = ("model", "model_kwargs", "recipe", "recipe_kwargs")
        mine = variant_config(variant)
        if any(declared[variant.name].get(k) != mine[k] for k in same):
            raise ValueError(
                f"{experiment.name}: variant {variant.name!r} is declared differently in {where}: "
                f"{ {k: declared[variant.name].get(k) for k in same} } vs { {k: mine[k] for k in same} }"
            )
        for run in source.get("runs", []):
            if run["variant"] == variant.name and run["seed"] in experiment.seeds:
                out.append({**run, "from_experiment": variant.from_experiment, "from_file": path.as_posix()})
    return out


def derive(
    experiment: Experiment, record: dict[str, Any], results_dir: str | os.PathLike = RESULTS_DIR
) -> dict[str, Any]:
    runs = list(record.get("runs", []))
    if any(v.from_experiment for v in experiment.variants):
        record["reused_runs"] = reused_runs(experiment, results_dir)
        runs += record["reused_runs"]
    record["summary"] = summarise(experiment, runs)
    record.pop("summary_extra", None)  # a declaration that dropped its extra metrics or reports drops their figures
    record.pop("reports", None)
    if experiment.extra_metrics:
        record["summary_extra"] = {
            metric: {
                v.name: s for v in experiment.variants if (s := summarise_metric(runs, v.name, metric)) is not None
            }
            for metric in experiment.extra_metrics
        }
    if experiment.reports:
        record["reports"] = [
            {
                "text": r.text,
                "variant": r.variant,
                "metric": r.metric,
                **(summarise_metric(runs, r.variant, r.metric) or {"n": 0}),
            }
            for r in experiment.reports
        ]
    record["claims"] = [judge_claim(c, runs, experiment.metric, experiment.seeds) for c in experiment.claims]
    declared = {(v.name, s) for v in experiment.variants for s in experiment.seeds}
    record["complete"] = declared <= {(r["variant"], r["seed"]) for r in runs}
    return record


# ----------------------------------------------------------------------------------------------------------------
# JSON file
# ----------------------------------------------------------------------------------------------------------------


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it from git before resuming") from err
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} has format {record.get('format')!r}, expected {FORMAT!r}")
    return record


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    text = json.dumps(record, indent=1, default=_json_default) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def variant_config(variant: Variant) -> dict[str, Any]:
    """A variant as the JSON records it (``from_experiment`` only when set, so older records keep their config)."""
    config = dataclasses.asdict(variant)
    if config["from_experiment"] is None:
        del config["from_experiment"]
    return config


def changed_config(record: dict[str, Any], fresh: dict[str, Any]) -> str | None:
    """Why the runs in ``record`` cannot share a table with the declaration behind ``fresh``, or None: the budget,
    the metric or the seeds differ, or a variant that has runs was removed or declared differently (its label
    aside). New variants and relabelled rows are fine."""
    old, new = record["config"], fresh["config"]
    if old["budget"] != new["budget"]:
        return f"budget {old['budget']} -> {new['budget']}"
    if old["seeds"] != new["seeds"]:
        return f"seeds {old['seeds']} -> {new['seeds']}"
    if record["metric"] != fresh["metric"]:
        return f"metric {record['metric']} -> {fresh['metric']}"

    def what_runs(variant: dict[str, Any] | None) -> dict[str, Any] | None:  # a label is only how a row reads
        return None if variant is None else {k: v for k, v in variant.items() if k != "label"}

    declared = {v["name"]: v for v in new["variants"]}
    recorded = {v["name"]: v for v in old["variants"]}
    for name in sorted({run["variant"] for run in record.get("runs", [])}):
        if name not in declared:
            return f"variant {name!r} has runs but is no longer declared"
        if what_runs(recorded.get(name)) != what_runs(declared[name]):
            return f"variant {name!r} is declared as {declared[name]}, its runs were made as {recorded.get(name)}"
    return None


def adopt_declaration(record: dict[str, Any], experiment: Experiment, path: str | os.PathLike) -> dict[str, Any]:
    """``record`` (the JSON at ``path``) under the current declaration of ``experiment``: a new variant, a label or
    a reworded title leaves its runs comparable and is taken over; any change in `changed_config` is refused."""
    fresh = new_record(experiment)
    changed = changed_config(record, fresh)
    if changed:
        raise ValueError(
            f"{path} holds runs of another configuration of {experiment.name!r} ({changed}); move it away, "
            f"`forget` the variants whose runs no longer fit, or restore the declaration they were made with"
        )
    record.update({key: fresh[key] for key in ("title", "metric", "notes", "config")})
    return record


def new_record(experiment: Experiment) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "experiment": experiment.name,
        "title": experiment.title,
        "metric": experiment.metric,
        "notes": experiment.notes,
        "config": {
            "budget": dataclasses.asdict(experiment.budget),
            "seeds": list(experiment.seeds),
            "variants": [variant_config(v) for v in experiment.variants],
        },
        "commands": [],
        "runs": [],
    }


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------

Job = Callable[[Experiment, Variant, int, Path], dict[str, Any]]


def pending_jobs(
    experiment: Experiment,
    record: dict[str, Any],
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[tuple[Variant, int]]:
    done = {(r["variant"], r["seed"]) for r in record.get("runs", [])}
    chosen = [experiment.variant(v) for v in variants] if variants else list(experiment.variants)
    reused = [v.name for v in chosen if v.from_experiment]
    if variants and reused:
        raise ValueError(
            f"{experiment.name}: {reused} reuse the runs of another experiment and are not run here; run them there"
        )
    chosen = [v for v in chosen if not v.from_experiment]
    seed_list = list(seeds) if seeds else list(experiment.seeds)
    # Seed-major order: after each full seed every variant has the same number of runs (a fair partial table).
    return [(v, s) for s in seed_list for v in chosen if (v.name, s) not in done]


def job_folder(runs_dir: str | os.PathLike, experiment: Experiment, variant: str, seed: int) -> Path:
    """Where one job of ``experiment`` keeps its checkpoints (``run`` resumes from it, ``forget`` moves it)."""
    return Path(runs_dir) / experiment.name / f"{variant}-seed{seed}"


def forget_runs(
    experiment: Experiment,
    variants: Sequence[str],
    reason: str,
    seeds: Sequence[int] | None = None,
    results_dir: str | os.PathLike = RESULTS_DIR,
    runs_dir: str | os.PathLike = RUNS_DIR,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Drop the runs of ``variants`` (optionally only ``seeds``) that a code change made stale, so that ``run``
    trains them again. The JSON keeps the finished ones that were dropped and why under ``dropped_runs`` (variant,
    seed, the metric), and every job folder of those variants and seeds, finished or interrupted, moves to
    ``RUNS/NAME/_stale/`` so that no new run resumes from an old checkpoint. Returns the dropped finished runs."""
    if not reason.strip():
        raise ValueError("forget needs a reason (e.g. the fix that made the runs stale)")
    for name in variants:
        variant = experiment.variant(name)  # raises for an unknown name
        if variant.from_experiment:
            raise ValueError(
                f"{experiment.name}: {name} reuses the runs of {variant.from_experiment}; forget them there"
            )
    path = experiment.result_path(results_dir)
    record = load_record(path)
    chosen_seeds = list(seeds) if seeds else list(experiment.seeds)
    finished = [r for r in record.get("runs", []) if r["variant"] in variants and r["seed"] in chosen_seeds]
    folders = [
        job_dir
        for name in variants
        for seed in chosen_seeds
        if (job_dir := job_folder(runs_dir, experiment, name, seed)).exists()
    ]
    if not finished and not folders:
        raise ValueError(f"{experiment.name} has no run of {list(variants)} (seeds {chosen_seeds}), finished or not")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    stale = Path(runs_dir) / experiment.name / "_stale" / stamp
    if folders:
        stale.mkdir(parents=True, exist_ok=True)
    for job_dir in folders:
        job_dir.rename(stale / job_dir.name)
    if finished:
        record["runs"] = [r for r in record["runs"] if r not in finished]
        record.setdefault("dropped_runs", []).append(
            {
                "reason": reason,
                "when": stamp,
                "runs": [
                    {"variant": r["variant"], "seed": r["seed"], experiment.metric: r.get(experiment.metric)}
                    for r in finished
                ],
            }
        )
        save_record(path, derive(experiment, record, results_dir))
    log(
        f"[{experiment.name}] dropped {len(finished)} finished run(s), moved {len(folders)} job folder(s) to "
        f"_stale ({reason}); `run` trains them again"
    )
    return finished


def merge_records(
    experiment: Experiment,
    other_path: str | os.PathLike,
    results_dir: str | os.PathLike = RESULTS_DIR,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Take into ``experiment``'s JSON the runs of another JSON of the same experiment that it lacks, e.g. seeds run
    at the same time by a second process or machine with ``run --seeds K --results-dir DIR``.

    Both records must fit the current declaration (`adopt_declaration`). A job present in both is kept once when its
    metric agrees (the shared history of two copies) and refused when it differs: two different runs of one job
    would make the table depend on which file was merged. The JSON keeps where the added runs came from, with that
    file's commands, versions and machine, under ``merged_from``. Returns the added runs."""
    path, other_path = experiment.result_path(results_dir), Path(other_path)
    if path.resolve() == other_path.resolve():
        raise ValueError(f"{other_path} is the record itself; merge another copy into it")
    other = load_record(other_path)
    if not other:
        raise FileNotFoundError(f"{other_path} does not exist")
    if other.get("experiment") != experiment.name:
        raise ValueError(f"{other_path} is a record of {other.get('experiment')!r}, not of {experiment.name!r}")
    other = adopt_declaration(other, experiment, other_path)
    record = load_record(path)
    record = adopt_declaration(record, experiment, path) if record else new_record(experiment)
    have = {(r["variant"], r["seed"]): r for r in record["runs"]}
    added = []
    for run in other.get("runs", []):
        mine = have.get((run["variant"], run["seed"]))
        if mine is None:
            added.append(run)
        elif mine.get(experiment.metric) != run.get(experiment.metric):
            raise ValueError(
                f"{run['variant']} seed {run['seed']} has {experiment.metric} {mine.get(experiment.metric)} in {path} "
                f"and {run.get(experiment.metric)} in {other_path}: two different runs of one job; `forget` one first"
            )
    if added:
        record["runs"] += added
        for key in ("versions", "machine"):  # a record made by merging alone describes the copy that ran its jobs
            if record.get(key) is None:
                record[key] = other.get(key)
        record.setdefault("merged_from", []).append(
            {
                "file": other_path.as_posix(),
                "commands": [c for c in other.get("commands", []) if c not in record["commands"]],
                "versions": other.get("versions"),
                "machine": other.get("machine"),
                "runs": [[r["variant"], r["seed"]] for r in added],
            }
        )
        save_record(path, derive(experiment, record, results_dir))
    log(f"[{experiment.name}] merged {len(added)} run(s) from {other_path} into {path}")
    return added


def run_experiment(
    experiment: Experiment,
    job: Job,
    results_dir: str | os.PathLike = RESULTS_DIR,
    runs_dir: str | os.PathLike = RUNS_DIR,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    max_minutes: float | None = None,
    threads: int | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every missing ``(variant, seed)`` of ``experiment``, saving the JSON after each job.

    A configuration that differs from the one already recorded in the JSON is refused: runs of two budgets in one
    table would not be comparable. ``max_minutes`` starts no new job after that much wall-clock time.
    """
    path = experiment.result_path(results_dir)
    record = load_record(path)
    record = adopt_declaration(record, experiment, path) if record else new_record(experiment)
    if threads:
        torch.set_num_threads(threads)
    command = command or shlex.join([Path(sys.executable).name, "-m", "fastseg.experiments", *sys.argv[1:]])
    if command not in record["commands"]:  # a resumed run repeats its command: list it once
        record["commands"].append(command)
    record["versions"] = versions()
    record["machine"] = machine_info(torch.get_num_threads())
    todo = pending_jobs(experiment, record, variants, seeds)
    log(f"[{experiment.name}] {len(todo)} job(s) to run -> {path}")
    start = time.monotonic()
    for variant, seed in todo:
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            log(f"[{experiment.name}] stopping: --max-minutes {max_minutes} reached; rerun to continue")
            break
        job_dir = job_folder(runs_dir, experiment, variant.name, seed)
        t0 = time.perf_counter()
        result = job(experiment, variant, seed, job_dir)
        result = {
            "variant": variant.name,
            "seed": seed,
            **result,
            "wall_s": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads(),
            "cpu": record["machine"]["cpu"],  # the record's machine is the last run command's; runs keep their own
        }
        record["runs"].append(result)
        save_record(path, derive(experiment, record, results_dir))
        log(
            f"[{experiment.name}] {variant.name} seed {seed}: {experiment.metric} = "
            f"{result[experiment.metric]:.4f} ({result['wall_s']:.0f} s)"
        )
    save_record(path, derive(experiment, record, results_dir))
    return record
