"""The diagnosis scripts under benchmarks/experiments/ whose figures README renders: their arithmetic, on small inputs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fastseg
from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.engine.recipes.gss import roundtrip_miou

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gss_token_diagnosis_round_trip_is_the_recipes():
    diagnosis = _script("gss_token_diagnosis")
    world = ShapesConfig(image_size=32)
    torch.manual_seed(0)
    model = fastseg.create_model("gss_ff_resnet18", num_classes=world.num_classes).eval()
    data = ShapesDataset("val", length=4, config=world, seed=0)
    encoded = []
    real_encode = model.encode_masks
    model.encode_masks = lambda labels: encoded.append(labels) or real_encode(labels)
    report = diagnosis.diagnose(model, data, batch_size=3)
    del model.encode_masks
    # Per batch the ignore-colour round trip encodes the labels as they are, the other one with the band filled.
    ignore = world.ignore_index
    assert [bool((labels == ignore).any()) for labels in encoded] == [True, False, True, False]
    # The "roundtrip" row is exactly what the experiments' round-trip recipe measures on the same images.
    expected = roundtrip_miou(
        model.tokenizer, model.maskige_palette, [data[i] for i in range(len(data))], world.num_classes
    )
    assert report["roundtrip"]["mIoU"] == pytest.approx(float(expected["mIoU"]), abs=1e-12)
    assert report["images"] == 4
    for name in ("roundtrip_ignore_colour", "roundtrip"):
        entry = report[name]
        assert 0.0 <= entry["token_agreement_with_head"] <= 1.0
        assert entry["pixels_where_tokens_differ"] >= 0
        assert set(entry["IoU"]) == set(world.class_names)
    ftw = fastseg.create_model("gss_ftw_resnet18", num_classes=world.num_classes)
    with pytest.raises(ValueError, match="GSS-FF"):
        diagnosis.diagnose(ftw, data)


class _Labels:
    def __init__(self, labels: torch.Tensor):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image_labels": self.labels[i]}


def test_label_prior_loss_is_the_mean_binary_entropy_of_the_label_rates():
    diagnosis = _script("semples_cam_diagnosis")
    labels = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0]])  # rates 3/4 and 1/4
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert diagnosis.label_prior_loss(_Labels(labels)) == pytest.approx(entropy, rel=1e-6)
    # ... which is the multilabel soft-margin loss of the constant logits log(rate / (1 - rate)).
    rate = labels.float().mean(0)
    logits = (rate / (1 - rate)).log().expand(len(labels), -1)
    loss = torch.nn.functional.multilabel_soft_margin_loss(logits, labels.float())
    assert diagnosis.label_prior_loss(_Labels(labels)) == pytest.approx(float(loss), rel=1e-6)


def test_precise_bn_diagnosis_reproduces_the_record_then_reestimates_on_the_labelled_images(tmp_path):
    from fastseg.checkpoint import save_weights
    from fastseg.engine import evaluate
    from fastseg.experiments.core import Budget, Claim, Experiment, Variant, job_folder

    diagnosis = _script("precise_bn_diagnosis")
    assert {"s4mim_1_8", "s4mim_1_16"} <= set(diagnosis.semi_experiments())
    split = {"labelled_fraction": 0.25, "train_length": 16}
    experiment = Experiment(
        name="tiny_semi",
        title="tiny",
        variants=(
            Variant("a", "unimatch_resnet18", recipe="semi", recipe_kwargs=split),
            Variant("b", "unimatch_resnet18", recipe="semi", recipe_kwargs=split),
        ),
        budget=Budget(steps=1, batch_size=2, val_length=4, image_size=32),
        seeds=(0,),
        claims=(Claim("b beats a", "b", "a"),),
    )
    world = ShapesConfig(image_size=32)
    val = ShapesDataset("val", length=4, config=world, seed=0)
    torch.manual_seed(0)
    model = fastseg.create_model("unimatch_resnet18", num_classes=world.num_classes)
    model.train()
    with torch.no_grad():  # statistics far from the clean images', as a strong view would leave them
        model(torch.randn(4, 3, 32, 32) * 3 + 2)
    weights = job_folder(tmp_path, experiment, "a", 0) / "model.safetensors"
    save_weights(model, weights)
    as_is = evaluate(model, val, batch_size=diagnosis.EVAL_BATCH, device="cpu", progress=False)["mIoU"]
    record = {"runs": [{"variant": "a", "seed": 0, "mIoU": as_is}, {"variant": "b", "seed": 0, "mIoU": 0.5}]}
    runs = diagnosis.diagnose(experiment, tmp_path, record, batch_size=3)
    # Only "a" has weights; its as-is figure reproduces the record; the statistics come from the 4 labelled images.
    assert [(r["variant"], r["seed"]) for r in runs] == [("a", 0)]
    assert runs[0]["as_is"] == pytest.approx(as_is, abs=1e-12) and runs[0]["bn_images"] == 4
    assert len(diagnosis.labelled_images(experiment, world)) == 4
    assert 0.0 <= runs[0]["mIoU"] <= 1.0
    record["runs"][0]["mIoU"] = as_is + 0.01  # weights that are not the recorded run's
    with pytest.raises(SystemExit, match="not the recorded run's"):
        diagnosis.diagnose(experiment, tmp_path, record)


def test_precise_bn_rerun_keeps_entries_whose_weights_are_gone_while_the_record_still_holds_their_run():
    from fastseg.experiments.core import Budget, Experiment, Variant

    diagnosis = _script("precise_bn_diagnosis")
    experiment = Experiment(
        name="tiny_semi",
        title="tiny",
        variants=(Variant("a", "unimatch_resnet18", recipe="semi"), Variant("b", "unimatch_resnet18", recipe="semi")),
        budget=Budget(steps=1, batch_size=2, val_length=4, image_size=32),
        seeds=(0, 1),
    )

    def entry(variant: str, seed: int, recorded: float) -> dict:
        return {"variant": variant, "seed": seed, "recorded": recorded, "as_is": recorded, "mIoU": recorded + 0.1}

    record = {"runs": [{"variant": v, "seed": s, "mIoU": 0.5 + s / 10} for v in "ab" for s in (0, 1)]}
    record["runs"][-1]["mIoU"] = 0.7  # b seed 1 was trained again since the earlier report
    earlier = [entry("a", 0, 0.5), entry("a", 1, 0.6), entry("b", 1, 0.6), entry("b", 0, 0.5)]
    fresh = [entry("a", 1, 0.6) | {"mIoU": 0.9}]  # a seed 1 diagnosed again now: the fresh figure wins
    runs = diagnosis.carry_over(earlier, fresh, experiment, record)
    assert [(r["variant"], r["seed"]) for r in runs] == [("a", 0), ("a", 1), ("b", 0)]
    assert runs[1]["mIoU"] == 0.9
    assert diagnosis.carry_over(earlier, fresh, experiment, {"runs": []}) == fresh  # runs since forgotten: dropped
