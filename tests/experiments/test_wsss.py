"""The weakly supervised experiment (`semples_shapes`): its recipe at a tiny budget, its claims, its README block, and
the checks from the diagnosis of the near-trivial partial run (class-id mapping of CAM channels, flip / scale of
the multi-scale CAMs, the CLIP image tower as WeakTr's backbone)."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import fastseg
from fastseg.data.weak import WeakShapes
from fastseg.engine.recipes import semples as R
from fastseg.experiments.core import Budget, Claim, judge_claim, run_experiment
from fastseg.experiments.declarations import SEMPLES_SHAPES
from fastseg.experiments.recipes import run_job
from fastseg.experiments.render import render_wsss
from fastseg.metrics import ConfusionMatrix
from fastseg.models.clip import build_clip
from fastseg.models.plain_cam import PlainCAM

TINY_SETTINGS = {
    "clip": {
        "config": "shapes-tiny-clip",
        "steps": 1,
        "batch_size": 2,
        "lr": 5e-4,
        "train_length": 4,
        "eval_length": 4,
    },
    "cam": {"model": "weaktr_shapes_clip", "steps": 1, "batch_size": 2, "lr": 2e-4, "plain_lr": 1e-3},
    "semples": {"steps": 1, "batch_size": 2, "lr": 2e-4, "prompt_lr": None},
    "train_length": 8,
    "eval_length": 4,
    "pseudo_length": 4,
    "threshold": 0.43,
}


def _tiny(variants: tuple[str, ...]) -> "dataclasses.Any":
    chosen = tuple(
        dataclasses.replace(v, recipe_kwargs={**TINY_SETTINGS, "method": v.recipe_kwargs["method"]})
        for v in SEMPLES_SHAPES.variants
        if v.name in variants
    )
    return dataclasses.replace(
        SEMPLES_SHAPES,
        variants=chosen,
        seeds=(0,),
        budget=Budget(steps=1, batch_size=2, warmup_steps=0, val_length=2),
        claims=tuple(c for c in SEMPLES_SHAPES.claims if c.better in variants and c.worse in variants),
    )


def test_claim_on_another_metric_and_lower_is_better():
    runs = [
        {"variant": "c", "seed": 0, "mIoU": 0.1, "leak": 0.2, "pseudo": 0.5},
        {"variant": "w", "seed": 0, "mIoU": 0.2, "leak": 0.3, "pseudo": 0.4},
    ]
    on_pseudo = judge_claim(Claim("c > w", "c", "w", metric="pseudo"), runs, "mIoU", (0,))
    assert on_pseudo["verdict"] == "holds" and on_pseudo["metric"] == "pseudo"
    assert on_pseudo["paired_differences"]["0"] == pytest.approx(0.1)
    assert judge_claim(Claim("c > w", "c", "w"), runs, "mIoU", (0,))["verdict"] == "does not hold"
    leak = judge_claim(Claim("c leaks less", "c", "w", metric="leak", lower_is_better=True), runs, "mIoU", (0,))
    assert leak["verdict"] == "holds" and leak["paired_differences"]["0"] == pytest.approx(0.1)
    # a claim whose metric a run lacks (the supervised arm has no pseudo masks) stays pending
    assert judge_claim(Claim("x", "c", "w", metric="absent"), runs, "mIoU", (0,))["verdict"] == "incomplete"


def test_declaration_budgets_are_equal():
    cam_methods = [v for v in SEMPLES_SHAPES.variants if v.recipe_kwargs["method"] != "supervised"]
    settings = {json.dumps({k: v for k, v in c.recipe_kwargs.items() if k != "method"}) for c in cam_methods}
    assert len(settings) == 1, "every method must train with the same settings"
    assert {v.model for v in SEMPLES_SHAPES.variants} == {"fpn_resnet18"}
    names = {v.name for v in SEMPLES_SHAPES.variants}
    assert all(c.better in names and c.worse in names for c in SEMPLES_SHAPES.claims)


@pytest.mark.slow  # ~30 s on the shared 2-core machine (CLIP, WeakTr, runs a-c, pseudo masks, two segmenters)
def test_wsss_recipe_tiny_budget_resumes_and_shares_prerequisites(tmp_path):
    experiment = _tiny(("weaktr", "semples_c", "supervised"))
    record = run_experiment(
        experiment, run_job, results_dir=tmp_path / "res", runs_dir=tmp_path / "runs", threads=1, log=lambda s: None
    )
    assert record["complete"]
    by_variant = {r["variant"]: r for r in record["runs"]}
    for name in ("weaktr", "semples_c"):
        run = by_variant[name]
        assert 0.0 <= run["pseudo_mIoU_fixed"] <= 1.0 and 0.0 <= run["pseudo_mIoU_swept"] <= 1.0
        assert set(run["pseudo_IoU_fixed"]) == set(fastseg.data.weak.weak_class_names())
        assert set(run["leakage"]) == set(fastseg.data.weak.weak_class_names()[1:])
        assert run["cam_steps"] == 1 and "mAP" in run["classification"]
    assert by_variant["semples_c"]["extra_steps"] == {"a": 1, "b": 1, "c": 1}
    assert "pseudo_mIoU_fixed" not in by_variant["supervised"] and "mIoU" in by_variant["supervised"]
    root = tmp_path / "runs" / "semples_shapes"
    # the CLIP once per experiment, the seed's WeakTr once (used by both variants), run (a) in its own variant's
    # folder so that semples_a would reuse it
    assert (root / "clip" / "model.safetensors").exists()
    assert (root / "weaktr-seed0" / "cam" / "model.safetensors").exists()
    assert (root / "semples_a-seed0" / "a" / "model.safetensors").exists()
    assert not (root / "semples_c-seed0" / "cam").exists()
    pseudo = json.loads((root / "semples_c-seed0" / "pseudo" / "meta.json").read_text())
    assert pseudo["num_classes"] == 9 and pseudo["threshold"] == 0.43
    again = run_experiment(
        experiment, run_job, results_dir=tmp_path / "res", runs_dir=tmp_path / "runs", threads=1, log=lambda s: None
    )
    assert len(again["runs"]) == 3


@pytest.mark.slow  # ~20 s on the shared machine
def test_plain_cam_recipe_tiny_budget(tmp_path):
    record = run_experiment(
        _tiny(("plain_cam",)), run_job, results_dir=tmp_path, runs_dir=tmp_path / "runs", threads=1, log=lambda s: None
    )
    run = record["runs"][0]
    assert run["classification"]["logits"] == "coarse_logits"
    assert not (tmp_path / "runs" / "semples_shapes" / "clip").exists(), "the plain CAM needs no CLIP"


def test_render_wsss_pending_then_from_record(tmp_path):
    text = render_wsss("semples_shapes", tmp_path)  # no JSON yet: the declared table, every claim pending
    assert "**Pending" in text and text.count("**pending**") == len(SEMPLES_SHAPES.claims)
    assert "| diamond (sand) |" in text and "python -m fastseg.experiments run semples_shapes" in text
    runs = []
    for variant in SEMPLES_SHAPES.variants:
        run = {"variant": variant.name, "seed": 0, "mIoU": 0.3}
        if variant.recipe_kwargs["method"] != "supervised":
            names = fastseg.data.weak.weak_class_names()
            run.update(
                pseudo_mIoU_fixed=0.25,
                pseudo_mIoU_swept=0.3,
                leakage_mean=0.1,
                classification={"mAP": 0.9},
                pseudo_IoU_fixed={n: 0.5 for n in names},
                leakage={n: 0.1 for n in names[1:]},
            )
        runs.append(run)
    from fastseg.experiments.core import derive, new_record

    record = derive(SEMPLES_SHAPES, {**new_record(SEMPLES_SHAPES), "runs": runs, "commands": ["cmd"]})
    path = tmp_path / "benchmarks" / "results" / "experiments" / "semples_shapes.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    text = render_wsss("semples_shapes", tmp_path)
    assert "| WeakTr (fine CAM) | 25.0 (n=1) | 30.0 (n=1) | 10.0 (n=1) | 90.0 (n=1) | 30.0 (n=1) |" in text
    assert "| fully supervised (ground truth) | – | – | – | – | 30.0 (n=1) |" in text
    assert "| circle (sky) | 50.0 (10) |" in text
    assert text.count("**pending**") == len(SEMPLES_SHAPES.claims)  # one seed of three: claims stay pending


# ---------------------------------------------------------------------------------------------------------------
# The diagnosis of the near-trivial partial run, as regression checks
# ---------------------------------------------------------------------------------------------------------------


def test_oracle_cams_give_perfect_pseudo_masks():
    """CAM channel k is WSSS id k + 1 (background 0): ground-truth maps as CAMs must score mIoU 1 against the
    evaluation's masks. An off-by-one between CAM channels, label ids or the world's class list fails this."""
    data = WeakShapes("train", length=12, with_masks=True)
    cm = ConfusionMatrix(data.num_classes, data.ignore_index)
    for i in range(len(data)):
        sample = data[i]
        mask = sample["mask"]
        cams = torch.stack([(mask == k + 1).float() for k in range(data.num_classes - 1)])[None]
        assert torch.equal(cams.flatten(2).amax(-1)[0] > 0, sample["image_labels"] > 0)  # labels = classes drawn
        cm.update(R.cams_to_labels(cams * sample["image_labels"][None, :, None, None], 0.43), mask[None])
    assert cm.compute()["mIoU"] == pytest.approx(1.0)


class _BrightnessCAM(torch.nn.Module):
    """A fake CAM model: class ``k``'s map is the input's channel-0 brightness pooled to stride 8 (others zero)."""

    patch_size, num_cam_classes = 8, 8

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward_cams(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = F.avg_pool2d(images[:, :1], 8)
        cams = torch.zeros(images.shape[0], 8, *pooled.shape[-2:])
        cams[:, self.k] = pooled[:, 0]
        return {"coarse": cams, "fine": cams}


def test_multiscale_cams_keep_place_class_and_positives():
    """Scales and flips come back aligned (a bright patch on the left stays on the left), the map lands in its
    class's channel, and a class the image does not hold is zeroed."""
    images = torch.zeros(1, 3, 64, 64)
    images[:, :, 16:32, 0:16] = 1.0
    labels = torch.zeros(1, 8)
    labels[0, 5] = 1
    pred = R.cams_to_labels(R.multiscale_cams(_BrightnessCAM(5), images, labels), 0.43)[0]
    assert (pred[20:28, 4:12] == 6).all() and (pred[:, 40:] == 0).all()
    assert (R.cams_to_labels(R.multiscale_cams(_BrightnessCAM(5), images, torch.eye(8)[:1]), 0.43) == 0).all()


def test_clip_image_tower_initialises_weaktr_exactly(tmp_path):
    """`weaktr_shapes_clip` with one class token computes CLIP's image tower: same patch tokens (after ln_post)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    clip = build_clip("shapes-tiny-clip")
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(path))
    model = fastseg.create_model(
        "weaktr_shapes_clip", class_names=("background", "thing"), backbone_checkpoint=path
    ).eval()
    visual = clip.model.visual
    visual.output_tokens = True
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, tokens = visual(x)
        y = model.norm_pre(
            torch.cat([model.cls_tokens.expand(2, -1, -1), model.patch_embed(x)], 1) + model._pos_embed(8, 8)
        )
        for block in model.blocks:
            y, _, _ = model._block(block, y)
    # LayerNorm eps differs (timm 1e-6, open_clip 1e-5): close, not bit-equal
    torch.testing.assert_close(visual.ln_post(y)[:, 1:], tokens, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="open_clip image tower"):
        fastseg.create_model("weaktr_shapes_tiny", backbone_checkpoint=path)


def test_plain_cam_model():
    torch.manual_seed(0)
    model = PlainCAM()
    out = model.forward_cams(torch.randn(2, 3, 64, 64))
    assert out["coarse"].shape == (2, 8, 8, 8)
    torch.testing.assert_close(out["coarse_logits"], out["coarse"].mean((2, 3)))
    labels = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 1], [0, 1.0, 0, 0, 0, 0, 0, 0]])
    loss = model.loss({"image": torch.randn(2, 3, 64, 64), "image_labels": labels})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad is not None
    with pytest.raises(ValueError, match="image_labels"):
        model.loss({"image": torch.randn(2, 3, 64, 64), "image_labels": torch.ones(2, 9)})


def test_cached_prerequisite_of_other_settings_is_refused(tmp_path):
    from fastseg.experiments.recipes import _once

    made = []
    _once(tmp_path / "clip", {"steps": 2}, lambda: made.append(1))
    _once(tmp_path / "clip", {"steps": 2}, lambda: made.append(2))  # same settings: resumes / reuses
    assert made == [1, 2]  # no model.safetensors was written, so `make` runs again (it resumes by itself)
    with pytest.raises(ValueError, match="other settings"):
        _once(tmp_path / "clip", {"steps": 3}, lambda: made.append(3))
    assert made == [1, 2]
