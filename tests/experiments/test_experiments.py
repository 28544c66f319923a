"""The experiments harness: resumable runs, refused budget changes, claim verdicts, and README rendering."""

import dataclasses
import json
from pathlib import Path

import pytest

from fastseg.engine.trainer import train
from fastseg.experiments import recipes
from fastseg.experiments.core import (
    Budget,
    Claim,
    Experiment,
    Variant,
    forget_runs,
    judge_claim,
    load_record,
    merge_records,
    run_experiment,
    summarise,
)
from fastseg.experiments.declarations import EXPERIMENTS
from fastseg.experiments.recipes import run_job
from fastseg.experiments.render import RESULTS, _claim_line, render_readme, render_text

ROOT = Path(__file__).resolve().parents[2]

TINY = Experiment(
    name="tiny",
    title="tiny",
    variants=(Variant("a", "fpn_resnet18"), Variant("b", "fpn_resnet18")),
    budget=Budget(steps=2, batch_size=2, warmup_steps=0, val_length=4, eval_every=1, image_size=32),
    seeds=(0, 1),
    claims=(Claim("b beats a", "b", "a"),),
)


def _runs(values: dict[tuple[str, int], float]) -> list[dict]:
    return [{"variant": v, "seed": s, "mIoU": x} for (v, s), x in values.items()]


def test_judge_claim_verdicts():
    seeds = (0, 1, 2)
    every = _runs({("b", 0): 0.6, ("a", 0): 0.5, ("b", 1): 0.55, ("a", 1): 0.5, ("b", 2): 0.51, ("a", 2): 0.5})
    claim = Claim("b beats a", "b", "a")
    verdict = judge_claim(claim, every, "mIoU", seeds)
    assert verdict["verdict"] == "holds"
    assert verdict["mean_difference"] == pytest.approx((0.1 + 0.05 + 0.01) / 3)
    assert verdict["paired_differences"] == pytest.approx({"0": 0.1, "1": 0.05, "2": 0.01})
    mixed = _runs({("b", 0): 0.7, ("a", 0): 0.5, ("b", 1): 0.45, ("a", 1): 0.5, ("b", 2): 0.5, ("a", 2): 0.5})
    assert judge_claim(claim, mixed, "mIoU", seeds)["verdict"] == "holds on average"
    assert judge_claim(Claim("a beats b", "a", "b"), mixed, "mIoU", seeds)["verdict"] == "does not hold"
    # "no more than 1 point below": a -0.5 point gap holds, a -2 point gap does not.
    within = Claim("b >= a - 1pt", "b", "a", margin=-0.01)
    near = _runs({("b", s): 0.495 for s in seeds} | {("a", s): 0.5 for s in seeds})
    far = _runs({("b", s): 0.48 for s in seeds} | {("a", s): 0.5 for s in seeds})
    assert judge_claim(within, near, "mIoU", seeds)["verdict"] == "holds"
    assert judge_claim(within, far, "mIoU", seeds)["verdict"] == "does not hold"
    assert judge_claim(claim, every[:3], "mIoU", seeds)["verdict"] == "incomplete"


def test_summary_mean_std_per_seed():
    runs = _runs({("a", 0): 0.5, ("a", 1): 0.7, ("b", 0): 0.6})
    summary = summarise(TINY, runs)
    assert summary["a"]["mean"] == pytest.approx(0.6)
    assert summary["a"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert summary["b"] == {"n": 1, "mean": 0.6, "std": None, "per_seed": {"0": 0.6}}


def test_run_resume_and_refused_budget_change(tmp_path):
    calls = []

    def fake_job(experiment, variant, seed, job_dir):
        calls.append((variant.name, seed))
        return {"mIoU": 0.5 + 0.1 * (variant.name == "b") + 0.01 * seed}

    record = run_experiment(
        TINY, fake_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", seeds=[0], command="first", log=lambda _: None
    )
    assert calls == [("a", 0), ("b", 0)] and not record["complete"]
    record = run_experiment(
        TINY, fake_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", command="second", log=lambda _: None
    )
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]  # seed 0 was not run again
    run_experiment(
        TINY, fake_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", command="first", log=lambda _: None
    )
    saved = load_record(tmp_path / "tiny.json")
    assert saved["complete"] and saved["commands"] == ["first", "second"]  # the repeated "first" is listed once
    assert {run["cpu"] for run in saved["runs"]} == {saved["machine"]["cpu"]}
    assert saved["claims"][0]["verdict"] == "holds"
    changed = dataclasses.replace(TINY, budget=dataclasses.replace(TINY.budget, steps=3))
    with pytest.raises(ValueError, match="another configuration"):
        run_experiment(changed, fake_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", log=lambda _: None)
    assert load_record(tmp_path / "tiny.json") == saved  # the refused run wrote nothing
    changed_a = dataclasses.replace(TINY, variants=(Variant("a", "fpn_resnet18", {"x": 1}), TINY.variants[1]))
    with pytest.raises(ValueError, match="variant 'a' is declared as"):
        run_experiment(changed_a, fake_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", log=lambda _: None)
    without_b = dataclasses.replace(TINY, variants=TINY.variants[:1])
    with pytest.raises(ValueError, match="variant 'b' has runs but is no longer declared"):
        run_experiment(without_b, fake_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", log=lambda _: None)
    assert load_record(tmp_path / "tiny.json") == saved
    # A new variant only adds rows and a new label only rewords one: the recorded runs stay, only the new jobs run.
    relabelled = dataclasses.replace(TINY.variants[0], label="the first")
    grown = dataclasses.replace(TINY, variants=(relabelled, TINY.variants[1], Variant("c", "fpn_resnet18")))
    record = run_experiment(grown, fake_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", log=lambda _: None)
    assert calls[4:] == [("c", 0), ("c", 1)] and record["complete"]
    assert [v["name"] for v in record["config"]["variants"]] == ["a", "b", "c"]
    assert record["config"]["variants"][0]["label"] == "the first"


def test_forget_drops_stale_runs_which_then_run_again(tmp_path):
    calls = []

    def fake_job(experiment, variant, seed, job_dir):
        calls.append((variant.name, seed))
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "last.safetensors").write_text(f"{variant.name}{seed}")
        return {"mIoU": 0.5 + 0.1 * (variant.name == "b") + 0.01 * seed}

    kw = dict(results_dir=tmp_path, runs_dir=tmp_path / "runs", log=lambda _: None)
    run_experiment(TINY, fake_job, **kw)
    with pytest.raises(ValueError, match="reason"):
        forget_runs(TINY, ["b"], " ", **kw)
    with pytest.raises(ValueError, match="no run of"):
        forget_runs(TINY, ["b"], "fix", seeds=[7], **kw)
    dropped = forget_runs(TINY, ["b"], "head fix in abc123", seeds=[1], **kw)
    assert [(r["variant"], r["seed"]) for r in dropped] == [("b", 1)]
    saved = load_record(tmp_path / "tiny.json")
    assert not saved["complete"] and saved["claims"][0]["verdict"] == "incomplete"
    assert saved["dropped_runs"][0]["reason"] == "head fix in abc123"
    assert saved["dropped_runs"][0]["runs"] == [{"variant": "b", "seed": 1, "mIoU": pytest.approx(0.61)}]
    assert not (tmp_path / "runs" / "tiny" / "b-seed1").exists()  # moved away: the rerun cannot resume from it
    assert list((tmp_path / "runs" / "tiny" / "_stale").glob("*/b-seed1/last.safetensors"))
    run_experiment(TINY, fake_job, **kw)
    assert calls[-1] == ("b", 1) and len(calls) == 5
    assert load_record(tmp_path / "tiny.json")["complete"]
    # An interrupted job (a folder, no finished run) of stale code is moved away too.
    (tmp_path / "runs" / "tiny" / "a-seed2").mkdir()
    assert forget_runs(TINY, ["a"], "fix", seeds=[2], **kw) == []
    assert not (tmp_path / "runs" / "tiny" / "a-seed2").exists()
    assert len(load_record(tmp_path / "tiny.json")["dropped_runs"]) == 1  # nothing finished was dropped


def test_merge_takes_in_the_seeds_another_process_ran(tmp_path):
    def fake_job(experiment, variant, seed, job_dir):
        return {"mIoU": 0.5 + 0.1 * (variant.name == "b") + 0.01 * seed}

    main, other = tmp_path / "benchmarks" / "results" / "experiments", tmp_path / "other"
    quiet = dict(runs_dir=tmp_path / "runs", log=lambda _: None)
    run_experiment(TINY, fake_job, results_dir=main, seeds=[0], command="seed 0", **quiet)
    (other / "tiny.json").parent.mkdir()
    (other / "tiny.json").write_bytes((main / "tiny.json").read_bytes())  # a copy of the shared history
    run_experiment(TINY, fake_job, results_dir=other, seeds=[1], command="seed 1 elsewhere", **quiet)
    added = merge_records(TINY, other / "tiny.json", results_dir=main, log=lambda _: None)
    assert sorted((r["variant"], r["seed"]) for r in added) == [("a", 1), ("b", 1)]  # seed 0 is not taken twice
    merged = load_record(main / "tiny.json")
    assert merged["complete"] and len(merged["runs"]) == 4 and merged["claims"][0]["verdict"] == "holds"
    assert merged["merged_from"][0]["commands"] == ["seed 1 elsewhere"]
    assert merged["merged_from"][0]["runs"] == [["a", 1], ["b", 1]]
    rendered = render_text("<!-- render: experiment tiny -->\n<!-- /render -->\n", tmp_path)
    assert "Commands: `seed 0`. Run in another copy and merged (`seed 1 elsewhere`): a seed 1, b seed 1." in rendered
    assert merge_records(TINY, other / "tiny.json", results_dir=main, log=lambda _: None) == []  # idempotent
    # The header names every processor the runs ran on; for runs made before they named it, the record's own and
    # the merged copy's.
    for run in merged["runs"]:
        del run["cpu"]
    merged["merged_from"][0]["machine"]["cpu"] = "Another CPU"
    (main / "tiny.json").write_text(json.dumps(merged))
    rendered = render_text("<!-- render: experiment tiny -->\n<!-- /render -->\n", tmp_path)
    assert f"validation images; {merged['machine']['cpu']} and Another CPU." in rendered
    for run in merged["runs"]:  # runs that name their processor are described by it alone
        run["cpu"] = "Run CPU"
    (main / "tiny.json").write_text(json.dumps(merged))
    assert "validation images; Run CPU." in render_text(
        "<!-- render: experiment tiny -->\n<!-- /render -->\n", tmp_path
    )
    # Into a folder with no record yet: the record describes the copy that ran the jobs.
    fresh = tmp_path / "fresh"
    (fresh / RESULTS / "experiments").mkdir(parents=True)
    merge_records(TINY, other / "tiny.json", results_dir=fresh / RESULTS / "experiments", log=lambda _: None)
    made = load_record(fresh / RESULTS / "experiments" / "tiny.json")
    assert made["machine"] == load_record(other / "tiny.json")["machine"] and len(made["runs"]) == 4
    rendered = render_text("<!-- render: experiment tiny -->\n<!-- /render -->\n", fresh)
    assert "Not run yet" not in rendered and "Run in another copy and merged (`seed 0`; `seed 1 elsewhere`)" in rendered
    with pytest.raises(ValueError, match="the record itself"):
        merge_records(TINY, main / "tiny.json", results_dir=main, log=lambda _: None)
    # Two different runs of one job: refused, nothing written.
    record = load_record(other / "tiny.json")
    record["runs"][0]["mIoU"] = 0.1
    (other / "tiny.json").write_text(json.dumps(record))
    before = (main / "tiny.json").read_bytes()
    with pytest.raises(ValueError, match="two different runs of one job"):
        merge_records(TINY, other / "tiny.json", results_dir=main, log=lambda _: None)
    assert (main / "tiny.json").read_bytes() == before
    # A copy made under another budget is refused as `run` refuses it.
    longer = dataclasses.replace(TINY, budget=dataclasses.replace(TINY.budget, steps=3))
    with pytest.raises(ValueError, match="another configuration"):
        merge_records(longer, other / "tiny.json", results_dir=main, log=lambda _: None)


class _Interrupted(Exception):
    pass


def test_supervised_recipe_trains_resumes_and_records_a_curve(tmp_path, monkeypatch):
    experiment = dataclasses.replace(TINY, variants=TINY.variants[:1], seeds=(0,), claims=())
    kw = dict(results_dir=tmp_path, runs_dir=tmp_path / "runs", command="t", log=lambda _: None)

    def interrupted_after_one_step(*args, **kwargs):
        train(*args, stop_at_step=1, **kwargs)
        raise _Interrupted

    monkeypatch.setattr(recipes, "train", interrupted_after_one_step)
    with pytest.raises(_Interrupted):
        run_experiment(experiment, run_job, **kw)
    assert not (tmp_path / "tiny.json").exists()  # no finished job, nothing recorded
    monkeypatch.setattr(recipes, "train", train)
    (run,) = run_experiment(experiment, run_job, **kw)["runs"]
    assert 0.0 <= run["mIoU"] <= 1.0 and len(run["IoU"]) == 12
    assert [step for step, _ in run["curve_mIoU"]] == [1, 2]  # eval_every=1 over 2 steps, the first before the stop
    assert run["curve_mIoU"][-1][1] == pytest.approx(run["mIoU"])  # the final point is the reported figure
    assert run["resumed_from_step"] == 1  # its wall_s times step 2 only, and the record says so


def test_declarations_are_consistent():
    for name, experiment in EXPERIMENTS.items():
        assert name == experiment.name
        names = [v.name for v in experiment.variants]
        assert len(set(names)) == len(names), name
        for claim in experiment.claims:
            assert claim.better in names and claim.worse in names, (name, claim)


def test_render_block_from_json(tmp_path):
    record_dir = tmp_path / "benchmarks" / "results" / "experiments"
    record_dir.mkdir(parents=True)

    def fake_job(experiment, variant, seed, job_dir):
        return {"mIoU": {"a": 0.5, "b": 0.625}[variant.name] + 0.0125 * seed}

    run_experiment(TINY, fake_job, results_dir=record_dir, runs_dir=tmp_path / "runs", command="python run", log=print)
    text = "before\n<!-- render: experiment tiny -->\nstale\n<!-- /render -->\nafter\n"
    out = render_text(text, tmp_path)
    assert out.startswith("before\n<!-- render: experiment tiny -->\n") and out.endswith("<!-- /render -->\nafter\n")
    assert "stale" not in out
    assert "| a | 50.62 ± 0.88 (n=2) | 50.00 / 51.25 |" in out
    assert "- b beats a: **holds** (paired differences per seed, points: +12.50, +12.50; mean +12.50)" in out
    assert "`python run`" in out


def test_readme_matches_the_committed_results():
    """README's rendered blocks equal what `python -m fastseg.experiments render` makes from the committed JSON."""
    assert render_readme(ROOT, check=True), (
        "README drifted from benchmarks/results: run `python -m fastseg.experiments render`"
    )


def test_claim_line_says_which_way_a_lower_is_better_difference_points():
    claim = {"text": "t", "verdict": "holds on average", "paired_differences": {"0": 0.012, "1": -0.003}}
    claim["mean_difference"] = 0.0046
    assert _claim_line(claim) == (
        "- t: **holds on average (not on every seed)** (paired differences per seed, points: +1.20, -0.30; mean +0.46)"
    )
    assert ", positive when the claimed side is lower: +1.2, -0.3; mean +0.5)" in _claim_line(
        {**claim, "lower_is_better": True}, digits=1
    )
