"""How much the BatchNorm running statistics cost the semi-supervised arms: every finished job re-evaluated after its
statistics are re-estimated on clean images.

During training, BatchNorm keeps an exponential average of the statistics of everything that passes through the
network in train mode. For the supervised-only arm that is clean labelled images. UniMatch also passes its strong
views (colour jitter, grayscale, blur, CutMix) and its feature-perturbed stream; S4MIM also passes its MIM inputs, one
class's visible pixels on a blank fill (or, for plain MIM, images with half their patches blanked). Evaluation
normalises with those averages, so an arm can lose accuracy to statistics that do not match clean images, whatever
its weights learned. This script separates the two: for each finished ``(variant, seed)`` job of a semi-supervised
experiment, it

* evaluates the job's final weights as they are (it must reproduce the recorded figure, else it stops);
* re-estimates every BatchNorm's statistics on the labelled training images, the same images for every arm, all
  of which every arm trained on (`fastseg.engine.recompute_bn_statistics`, "precise BN"), and evaluates again;

and judges the experiment's claims on the re-estimated figures too. Weights are never changed: this measures the
statistics, not another training.

A rerun adds the jobs finished since and keeps the earlier report's entries for jobs whose weights are no longer on
disk, as long as the experiment's record still holds those runs unchanged.

Usage (after ``python -m fastseg.experiments run s4mim_1_8`` has finished some jobs)::

    python benchmarks/experiments/precise_bn_diagnosis.py --experiment s4mim_1_8 \\
        [--runs runs/experiments] [--out benchmarks/results/experiments/s4mim_1_8_precise_bn.json]

A diagnosis of trained models, not an experiment: it trains nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from fastseg.checkpoint import load_state_dict
from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.engine import evaluate, recompute_bn_statistics
from fastseg.experiments.core import (
    RUNS_DIR,
    Experiment,
    job_folder,
    judge_claim,
    load_record,
    machine_info,
    summarise,
    versions,
)
from fastseg.experiments.declarations import EXPERIMENTS
from fastseg.registry import create_model

# The recipes' evaluation batch (`fastseg.experiments.recipes._train_config`): the as-is figure must match the record.
EVAL_BATCH = 32
# A re-evaluation of the recorded weights may differ from the record by a few argmax flips (thread count), no more.
REPRODUCE_TOLERANCE = 1e-3


def semi_experiments() -> list[str]:
    return sorted(n for n, e in EXPERIMENTS.items() if e.variants and e.variants[0].recipe == "semi")


def labelled_images(experiment: Experiment, world: ShapesConfig) -> ShapesDataset:
    """The labelled training images of the experiment's split (the recipe's: world seed 0, 4096 train images)."""
    fractions = {v.recipe_kwargs["labelled_fraction"] for v in experiment.variants}
    lengths = {v.recipe_kwargs.get("train_length", 4096) for v in experiment.variants}
    if len(fractions) != 1 or len(lengths) != 1:
        raise SystemExit(f"{experiment.name}: its variants use several labelled splits ({fractions}, {lengths})")
    return ShapesDataset(
        "train", length=lengths.pop(), config=world, seed=0, subset="labelled", labelled_fraction=fractions.pop()
    )


def recorded_figures(experiment: Experiment, record: dict) -> dict[tuple[str, int], float]:
    """``(variant, seed) -> metric`` of every run the record holds, its own and those reused from other experiments."""
    runs = list(record.get("runs", [])) + list(record.get("reused_runs", []))
    return {(r["variant"], r["seed"]): r[experiment.metric] for r in runs}


def diagnose(experiment: Experiment, runs_dir: Path, record: dict, batch_size: int = 16) -> list[dict]:
    """The as-is and re-estimated mIoU of every job that has both a recorded run and its final weights."""
    world = ShapesConfig(image_size=experiment.budget.image_size)
    val = ShapesDataset("val", length=experiment.budget.val_length, config=world, seed=0)
    pool = labelled_images(experiment, world)
    # Runs reused from another experiment (``from_experiment``) are diagnosed from that experiment's job folders.
    recorded = recorded_figures(experiment, record)
    out = []
    for variant in experiment.variants:
        owner = EXPERIMENTS[variant.from_experiment] if variant.from_experiment else experiment
        for seed in experiment.seeds:
            weights = job_folder(runs_dir, owner, variant.name, seed) / "model.safetensors"
            if (variant.name, seed) not in recorded or not weights.exists():
                continue
            model = create_model(variant.model, num_classes=world.num_classes, **variant.model_kwargs)
            model.load_state_dict(load_state_dict(weights))
            as_is = evaluate(model, val, batch_size=EVAL_BATCH, device="cpu", progress=False)["mIoU"]
            if abs(as_is - recorded[(variant.name, seed)]) > REPRODUCE_TOLERANCE:
                raise SystemExit(
                    f"{weights} evaluates to {as_is:.4f}, the record says {recorded[(variant.name, seed)]:.4f}: "
                    f"these weights are not the recorded run's"
                )
            batches = (
                torch.stack([pool[i]["image"] for i in range(s, min(s + batch_size, len(pool)))])
                for s in range(0, len(pool), batch_size)
            )
            images = recompute_bn_statistics(model, batches)
            precise = evaluate(model, val, batch_size=EVAL_BATCH, device="cpu", progress=False)["mIoU"]
            entry = {
                "variant": variant.name,
                "seed": seed,
                "recorded": recorded[(variant.name, seed)],
                "as_is": float(as_is),
                "mIoU": float(precise),
                "bn_images": images,
            }
            print(f"{variant.name:20s} seed {seed}: {as_is:.4f} as recorded -> {precise:.4f} BN re-estimated")
            out.append(entry)
    return out


def carry_over(earlier: list[dict], fresh: list[dict], experiment: Experiment, record: dict) -> list[dict]:
    """``fresh`` plus the entries of an earlier report for jobs not diagnosed now (their weights are gone: another
    machine, a lost checkout) whose run the experiment's record still holds with the same figure; in declaration
    order. An entry whose run was dropped or trained again is not carried over."""
    recorded = recorded_figures(experiment, record)
    done = {(e["variant"], e["seed"]) for e in fresh}
    kept = [
        e
        for e in earlier
        if (e["variant"], e["seed"]) not in done and recorded.get((e["variant"], e["seed"])) == e["recorded"]
    ]
    order = {v.name: i for i, v in enumerate(experiment.variants)}
    return sorted(fresh + kept, key=lambda e: (order[e["variant"]], e["seed"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="s4mim_1_8", choices=semi_experiments())
    parser.add_argument("--runs", default=str(RUNS_DIR), help="the experiments' run folder")
    parser.add_argument("--out", help="default: benchmarks/results/experiments/<experiment>_precise_bn.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    experiment = EXPERIMENTS[args.experiment]
    record = load_record(experiment.result_path())
    fresh = diagnose(experiment, Path(args.runs), record)
    if not fresh:
        raise SystemExit(f"no finished job of {args.experiment} with its weights under {args.runs}")
    out = Path(args.out or f"benchmarks/results/experiments/{args.experiment}_precise_bn.json")
    earlier = json.loads(out.read_text()) if out.exists() else {"runs": [], "commands": []}
    runs = carry_over(earlier["runs"], fresh, experiment, record)
    command = shlex.join(["python", *sys.argv])
    report = {
        "commands": earlier["commands"] + [command] * (command not in earlier["commands"]),
        "experiment": args.experiment,
        "metric": experiment.metric,
        "bn_images": "the labelled training images of the split, the same for every arm",
        "runs": runs,
        "summary_recorded": summarise(experiment, [{**r, "mIoU": r["recorded"]} for r in runs]),
        "summary": summarise(experiment, runs),
        "claims": [judge_claim(c, runs, experiment.metric, experiment.seeds) for c in experiment.claims],
        "versions": versions(),
        "machine": machine_info(1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"-> {out} ({len(fresh)} job(s) diagnosed now, {len(runs) - len(fresh)} carried over from the earlier report)"
    )


if __name__ == "__main__":
    main()
