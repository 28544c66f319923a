"""Runs reused across experiments, the GSS and PADing recipes at a tiny budget, and their README blocks."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fastseg.checkpoint import load_state_dict
from fastseg.data.shapes import CLASS_NAMES
from fastseg.experiments.core import (
    RESULTS_DIR,
    Budget,
    Claim,
    Experiment,
    Report,
    Variant,
    derive,
    load_record,
    new_record,
    pending_jobs,
    run_experiment,
)
from fastseg.experiments.declarations import EXPERIMENTS, GSS_SHAPES, PADING_ZERO_SHOT
from fastseg.experiments.recipes import run_job
from fastseg.experiments.render import render_text

ROOT = Path(__file__).resolve().parents[2]
BUDGET = Budget(steps=2, batch_size=2, warmup_steps=0, val_length=4, eval_every=0, image_size=32)

SOURCE = Experiment(
    name="source",
    title="source",
    variants=(Variant("base", "fpn_resnet18", label="base"), Variant("other", "fpn_resnet18")),
    budget=BUDGET,
    seeds=(0, 1),
)
REUSER = Experiment(
    name="reuser",
    title="reuser",
    variants=(Variant("base", "fpn_resnet18", label="base", from_experiment="source"), Variant("new", "fpn_resnet18")),
    budget=BUDGET,
    seeds=(0, 1),
    claims=(Claim("new beats base", "new", "base"),),
)


def _fake_job(calls):
    def job(experiment, variant, seed, job_dir):
        calls.append((experiment.name, variant.name, seed))
        return {"mIoU": {"base": 0.5, "other": 0.4, "new": 0.55}[variant.name] + 0.01 * seed}

    return job


def _run(experiment, job, tmp_path, **kwargs):
    return run_experiment(
        experiment, job, results_dir=tmp_path, runs_dir=tmp_path / "runs", command="c", log=lambda _: None, **kwargs
    )


def test_reused_runs_are_read_from_the_other_experiment_and_never_run(tmp_path):
    calls = []
    record = _run(REUSER, _fake_job(calls), tmp_path)  # the source has no JSON yet: only "new" runs
    assert calls == [("reuser", "new", 0), ("reuser", "new", 1)]
    assert record["reused_runs"] == [] and not record["complete"]
    assert record["claims"][0]["verdict"] == "incomplete"
    _run(SOURCE, _fake_job(calls), tmp_path, seeds=[0])
    record = _run(REUSER, _fake_job(calls), tmp_path)  # nothing left to run; the summary now has seed 0 of base
    assert len(calls) == 4 and [r["seed"] for r in record["reused_runs"]] == [0]
    _run(SOURCE, _fake_job(calls), tmp_path)
    record = _run(REUSER, _fake_job(calls), tmp_path)
    assert calls[-2:] == [("source", "base", 1), ("source", "other", 1)]  # still nothing of "reuser" ran again
    assert record["complete"] and record["summary"]["base"]["per_seed"] == {"0": 0.5, "1": 0.51}
    assert record["claims"][0]["verdict"] == "holds"
    assert record["claims"][0]["paired_differences"] == pytest.approx({"0": 0.05, "1": 0.05})
    for run in record["reused_runs"]:  # where each number came from
        assert run["from_experiment"] == "source" and run["from_file"] == (tmp_path / "source.json").as_posix()
    assert all("from_experiment" not in r for r in load_record(tmp_path / "reuser.json")["runs"])
    with pytest.raises(ValueError, match="reuse the runs of another experiment"):
        pending_jobs(REUSER, record, variants=["base"])
    rendered = render_text("<!-- render: experiment reuser -->\n<!-- /render -->\n", _root_with(tmp_path))
    assert "| base (runs of `source`) | 50.50 ± 0.71 (n=2) | 50.00 / 51.00 |" in rendered


def _root_with(results_dir: Path) -> Path:
    """A fake repository root whose benchmarks/results/experiments is ``results_dir``."""
    root = results_dir / "root"
    (root / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    link = root / "benchmarks" / "results" / "experiments"
    if not link.exists():
        link.symlink_to(results_dir)
    return root


def test_mean_curve_block_averages_seeds_includes_reused_runs_and_the_lead(tmp_path):
    def job(experiment, variant, seed, job_dir):
        final = {"base": 0.5, "other": 0.4, "new": 0.55}[variant.name] + 0.01 * seed
        return {"mIoU": final, "curve_mIoU": [[1, final - 0.1], [2, final]]}

    _run(SOURCE, job, tmp_path)
    _run(REUSER, job, tmp_path, seeds=[0])
    root = _root_with(tmp_path)
    text = render_text("<!-- render: curve-mean reuser new base -->\n<!-- /render -->\n", root)
    lines = text.splitlines()
    # new has seed 0 only: the lead is paired on seed 0 (+5.0), not the difference of the means (55.0 - 50.5)
    assert lines[1] == "| step | base (seeds [0, 1]) | new (seeds [0]) | `new` − `base` (paired, seeds [0]) |"
    assert lines[4] == "| 2 | 50.5 | 55.0 | +5.0 |"
    _run(REUSER, job, tmp_path)
    text = render_text("<!-- render: curve-mean reuser new base -->\n<!-- /render -->\n", root)
    lines = text.splitlines()
    assert lines[1] == "| step | base (seeds [0, 1]) | new (seeds [0, 1]) | `new` − `base` (paired, seeds [0, 1]) |"
    assert lines[3] == "| 1 | 40.5 | 45.5 | +5.0 |"  # base (runs of source): mean of 0.40 and 0.41
    assert lines[4] == "| 2 | 50.5 | 55.5 | +5.0 |"
    plain = render_text("<!-- render: curve-mean reuser -->\n<!-- /render -->\n", root)
    assert plain.splitlines()[1] == "| step | base (seeds [0, 1]) | new (seeds [0, 1]) |"
    for bad in ("reuser new", "reuser new nope"):
        with pytest.raises(ValueError, match="curve-mean"):
            render_text(f"<!-- render: curve-mean {bad} -->\n<!-- /render -->\n", root)


def test_reuse_refuses_a_source_of_another_budget_or_declaration(tmp_path):
    _run(SOURCE, _fake_job([]), tmp_path)
    longer = dataclasses.replace(REUSER, budget=dataclasses.replace(BUDGET, steps=3))
    with pytest.raises(ValueError, match="another budget"):
        derive(longer, new_record(longer), tmp_path)
    other_model = dataclasses.replace(
        REUSER, variants=(Variant("base", "ecenet_resnet18", from_experiment="source"), REUSER.variants[1])
    )
    with pytest.raises(ValueError, match="declared differently"):
        derive(other_model, new_record(other_model), tmp_path)
    missing = dataclasses.replace(REUSER, variants=(Variant("nope", "fpn_resnet18", from_experiment="source"),))
    with pytest.raises(ValueError, match="has no variant 'nope'"):
        derive(missing, new_record(missing), tmp_path)


def test_records_of_existing_declarations_keep_their_configuration():
    """Adding Variant.from_experiment must not change the recorded config of older records (resume compares it)."""
    for path in sorted((ROOT / "benchmarks/results/experiments").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("format") == "fastseg.experiments/1" and record["experiment"] in EXPERIMENTS:
            assert record["config"] == new_record(EXPERIMENTS[record["experiment"]])["config"], path.name


def test_committed_records_hold_what_their_runs_derive(monkeypatch):
    """Summaries and claims (and reused runs) in committed JSON equal what the runs derive today: a source
    experiment that moved on, or a changed claim, shows here until the record is refreshed."""
    # Derived as the harness does, from the repository root with its relative results folder, so that each reused
    # run's ``from_file`` reads as recorded.
    monkeypatch.chdir(ROOT)
    results = RESULTS_DIR
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("format") != "fastseg.experiments/1" or record["experiment"] not in EXPERIMENTS:
            continue
        again = derive(EXPERIMENTS[record["experiment"]], copy.deepcopy(record), results)
        for key in ("summary", "claims", "complete", "reused_runs", "summary_extra", "reports"):
            assert again.get(key) == record.get(key), (path.name, key)


# ---------------------------------------------------------------------------------------------------- GSS recipe
def _tiny_gss() -> Experiment:
    tok = {"tokenizer_steps": 2, "tokenizer_batch": 2, "tokenizer_lr": 3e-3}
    variants = []
    for v in GSS_SHAPES.variants:
        if v.from_experiment:
            continue
        kwargs = {**v.recipe_kwargs, **tok}
        if "steps" in kwargs:
            kwargs["steps"] = 1
        variants.append(dataclasses.replace(v, recipe_kwargs=kwargs))
    return dataclasses.replace(GSS_SHAPES, variants=tuple(variants), budget=BUDGET, seeds=(0,))


def test_gss_recipe_tokenizers_cached_ftw_from_ff(tmp_path, monkeypatch):
    import fastseg.engine.recipes.gss as gss_recipes

    fits = []
    for name in ("fit_image_tokenizer", "train_maskige_vqvae"):
        real = getattr(gss_recipes, name)
        monkeypatch.setattr(
            gss_recipes, name, lambda *a, _real=real, _name=name, **k: fits.append(_name) or _real(*a, **k)
        )
    experiment = _tiny_gss()
    runs_dir = tmp_path / "runs"
    ftw = experiment.variant("gss_ftw_images")
    with pytest.raises(FileNotFoundError, match="run that job first"):
        run_job(experiment, ftw, 0, runs_dir / "gss_shapes" / "gss_ftw_images-seed0")
    record = run_experiment(experiment, run_job, results_dir=tmp_path, runs_dir=runs_dir, log=lambda _: None)
    by = {r["variant"]: r for r in record["runs"]}
    assert set(by) == {"roundtrip_images", "gss_ff_images", "gss_ftw_images", "roundtrip_masks", "gss_ff_masks"}
    folder = runs_dir / "gss_shapes"
    images_info = json.loads((folder / "tokenizer-images-seed0" / "info.json").read_text())
    assert images_info["config"]["trained_on"] == "images"
    # The round-trip jobs fitted each tokenizer once; the GSS jobs reused those fits (the same cached info).
    assert fits == ["fit_image_tokenizer", "train_maskige_vqvae"]
    assert by["roundtrip_images"]["tokenizer"] == by["gss_ff_images"]["tokenizer"] == by["gss_ftw_images"]["tokenizer"]
    assert 0.0 <= by["roundtrip_images"]["mIoU"] <= 1.0 and set(by["roundtrip_images"]["IoU"]) == set(CLASS_NAMES)
    assert by["gss_ff_masks"]["tokenizer"] == by["roundtrip_masks"]["tokenizer"]
    assert by["gss_ff_masks"]["tokenizer"]["config"]["trained_on"] == "masks"
    assert by["gss_ftw_images"]["steps"] == 1
    ff_state = load_state_dict(folder / "gss_ff_images-seed0" / "model.safetensors")
    ftw_state = load_state_dict(folder / "gss_ftw_images-seed0" / "model.safetensors")
    # Everything but the inverse (backbone, prior head, tokenizer, palette, BN statistics) is the GSS-FF job's.
    assert set(ff_state) == {k for k in ftw_state if not k.startswith("inverse.")}
    for key, value in ff_state.items():
        assert torch.equal(value, ftw_state[key]), key
    assert "summary_extra" not in record and "reports" not in record
    # A tokenizer cache made with another configuration is refused rather than silently reused.
    ff = experiment.variant("gss_ff_images")
    changed = dataclasses.replace(ff, recipe_kwargs={**ff.recipe_kwargs, "tokenizer_steps": 3})
    with pytest.raises(ValueError, match="was built with"):
        run_job(experiment, changed, 0, folder / "gss_ff_images-seed0")


def test_a_declared_gss_block_renders_before_any_run_with_the_reused_baseline(tmp_path):
    # Only the baseline's record exists: the block comes from the declaration, with the reused FPN rows filled in.
    (tmp_path / "ecenet_vs_fpn.json").write_text(
        (ROOT / "benchmarks/results/experiments/ecenet_vs_fpn.json").read_text()
    )
    text = render_text("<!-- render: experiment gss_shapes -->\n<!-- /render -->\n", _root_with(tmp_path))
    assert "`fpn_resnet18`, the baseline (runs of `ecenet_vs_fpn`)" in text
    assert "**pending**" in text
    assert "Not run yet: `python -m fastseg.experiments run gss_shapes`." in text


# ------------------------------------------------------------------------------------------------- PADing recipe
@pytest.mark.slow
def test_pading_recipe_stage1_shared_and_zero_shot_metrics(tmp_path):
    stage1 = {"steps": 2, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 0, "grad_clip": 1.0}
    variants = tuple(
        dataclasses.replace(v, recipe_kwargs={**v.recipe_kwargs, "stage1": stage1})
        for v in PADING_ZERO_SHOT.variants[:2]
    )
    experiment = dataclasses.replace(
        PADING_ZERO_SHOT, variants=variants, budget=dataclasses.replace(BUDGET, image_size=64), seeds=(0,)
    )
    record = run_experiment(experiment, run_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", log=lambda _: None)
    seen_only, pading = record["runs"]
    assert seen_only["stage1"] == pading["stage1"]  # one stage-1 checkpoint per seed, shared
    assert "last_losses" in pading and "last_losses" not in seen_only
    for key in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic", "PQ_unseen", "AP50_harmonic"):
        assert key in pading
    rendered = render_text(
        "<!-- render: pading-experiment pading_zero_shot -->\n<!-- /render -->\n", _root_with(tmp_path)
    )
    assert "| PADing (primitive generator + structure losses) | mIoU |" in rendered
    assert "(b) PADing's unseen mIoU is above the seen-only classifier's: **" in rendered


def test_pading_block_renders_claims_and_reports(tmp_path):
    """The PADing table from fake runs: seen / unseen / harmonic per metric, reported figures, verdicts."""
    experiment = dataclasses.replace(
        PADING_ZERO_SHOT, reports=(Report("seen-only unseen mIoU", "seen_only", "mIoU_unseen"),)
    )

    def fake(exp, variant, seed, job_dir):
        base = {"seen_only": 0.0, "pading": 0.2, "gmmn": 0.1, "no_structure": 0.15}[variant.name]
        values = {k: base + 0.01 * seed for k in exp.extra_metrics}
        values["AP50_unseen"] = float("nan") if seed == 2 else values["AP50_unseen"]  # an absent class: NaN
        return {**values, "mIoU_harmonic": base + 0.01 * seed, "mIoU_unseen": base + 0.01 * seed}

    run_experiment(experiment, fake, results_dir=tmp_path, runs_dir=tmp_path / "runs", command="cmd", log=print)
    text = render_text("<!-- render: pading-experiment pading_zero_shot -->\n<!-- /render -->\n", _root_with(tmp_path))
    assert "| PADing (primitive generator + structure losses) | mIoU | 21.0 ± 1.0 (20.0 / 21.0 / 22.0) |" in text
    # The NaN of seed 2 (a class no image holds) is shown, and left out of the mean.
    assert "| AP50 | 21.0 ± 1.0 (20.0 / 21.0 / 22.0) | 20.5 ± 0.7 (20.0 / 21.0 / nan) |" in text
    assert "- seen-only unseen mIoU: **1.00 ± 1.00** % (n=3; per seed: 0.00 / 1.00 / 2.00)" in text
    assert (
        "- (c) PADing beats the GMMN generator, harmonic mIoU: **holds** (paired differences per seed, points: " in text
    )
    assert "Commands: `cmd`" in text


def test_new_declarations_are_consistent():
    """Reported figures name declared variants; reused variants match their source's declaration and budget."""
    for experiment in EXPERIMENTS.values():
        names = {v.name for v in experiment.variants}
        for report in experiment.reports:
            assert report.variant in names, (experiment.name, report)
        for claim in experiment.claims:
            assert claim.metric in (None, experiment.metric, *experiment.extra_metrics), (experiment.name, claim)
        for variant in experiment.variants:
            if variant.from_experiment:
                source = EXPERIMENTS[variant.from_experiment]
                assert source.budget == experiment.budget and set(experiment.seeds) <= set(source.seeds)
                assert dataclasses.replace(source.variant(variant.name), label="") == dataclasses.replace(
                    variant, label="", from_experiment=None
                )
    ftw = GSS_SHAPES.variant("gss_ftw_images")
    ff = GSS_SHAPES.variant(ftw.recipe_kwargs["init_from"])
    names = [v.name for v in GSS_SHAPES.variants]
    assert names.index(ff.name) < names.index(ftw.name)  # seed-major order runs the GSS-FF job first
    assert {k: v for k, v in ftw.recipe_kwargs.items() if k not in ("init_from", "steps")} == ff.recipe_kwargs
