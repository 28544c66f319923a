"""PADing's stage-2 schedule, configuration checks and the zero-shot metric helpers (no model needed)."""

import math

import pytest

from fastseg.data.shapes import ShapesConfig
from fastseg.engine.recipes.pading import (
    Stage2Config,
    _generator_lr_factor,
    check_split,
    harmonic_mean,
    seen_only_segmenter,
)


def test_generator_schedule_is_warmup_then_multistep():
    cfg = Stage2Config(steps=200, warmup_steps=10)
    assert cfg.milestones() == (140, 185)  # 70 % and 92.5 %, as 14 000 / 18 500 of 20 000
    assert _generator_lr_factor(0, cfg) == pytest.approx(1e-3)  # detectron2's linear warm-up from 1/1000
    assert _generator_lr_factor(5, cfg) == pytest.approx(1e-3 * 0.5 + 0.5)
    assert _generator_lr_factor(10, cfg) == 1.0
    assert _generator_lr_factor(139, cfg) == 1.0
    assert _generator_lr_factor(140, cfg) == pytest.approx(0.1)
    assert _generator_lr_factor(199, cfg) == pytest.approx(0.01)
    assert Stage2Config(steps=50, generator_milestones=(20,)).milestones() == (20,)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Stage2Config(steps=0).validate()
    with pytest.raises(ValueError, match="classifier_lr must be > 0"):
        Stage2Config(classifier_lr=0.0).validate()
    with pytest.raises(ValueError, match="no unseen class"):
        check_split([0, 1], [])
    with pytest.raises(ValueError, match="no seen class"):
        check_split([], [0, 1])
    with pytest.raises(ValueError, match="a Mask2Former; got 'fpn_resnet18'"):
        seen_only_segmenter("fpn_resnet18", ShapesConfig(), "panoptic")
    with pytest.raises(ValueError, match="task must be one of"):
        seen_only_segmenter("mask2former_resnet18", ShapesConfig(), "depth")
    with pytest.raises(ValueError, match="no unseen class"):
        seen_only_segmenter("mask2former_resnet18", ShapesConfig(unseen_classes=()), "panoptic")


def test_harmonic_mean():
    assert harmonic_mean(0.4, 0.1) == pytest.approx(2 * 0.4 * 0.1 / 0.5)
    assert harmonic_mean(0.4, 0.0) == 0.0
    assert math.isnan(harmonic_mean(math.nan, 0.3))


@pytest.mark.parametrize("name,runs", [("pading_shapes", 12), ("pading_shapes_long", 9)])
def test_claims_records_are_complete(name, runs):
    """The earlier records README renders (tests/experiments checks the rendering) hold every run they declared."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    report = json.loads((root / f"benchmarks/results/experiments/legacy/{name}.json").read_text())
    assert report["complete"] and len(report["runs"]) == runs and {r["seed"] for r in report["runs"]} == {0, 1, 2}
