"""SemPLeS recipes end to end at toy sizes: resume of a crashed run, pseudo-mask folders and their validation, the
CRF message, the weak label space and captions of the shapes world, CLIP retrieval metrics."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import fastseg
from fastseg.checkpoint import save_weights
from fastseg.data.pseudo import PseudoMaskDataset
from fastseg.data.shapes import ShapesDataset
from fastseg.data.weak import WeakShapes, caption, caption_variants, to_weak_mask
from fastseg.engine.recipes import semples as recipes
from fastseg.engine.recipes.clip import CaptionedShapes, clip_retrieval_accuracy
from fastseg.models.clip import build_clip


@pytest.fixture(scope="module")
def weaktr_file(tmp_path_factory):
    torch.manual_seed(0)
    model = fastseg.create_model("weaktr_shapes_tiny")
    path = tmp_path_factory.mktemp("weaktr") / "weaktr.safetensors"
    save_weights(model, path, {"class_names": json.dumps(list(model.pretrained_cfg.class_names))})
    return path


def test_crashed_run_resumes_from_its_last_checkpoint(weaktr_file, tmp_path):
    clip = build_clip()
    options = recipes.RunOptions(steps=2, batch_size=2, train_length=8, save_every=1, lr=1e-3, device="cpu")
    straight = recipes.run_segment_label_matching(weaktr_file, clip, tmp_path / "straight", options)
    crash = replace(options, stop_at_step=1)
    crashed = recipes.run_segment_label_matching(weaktr_file, clip, tmp_path / "crash", crash)
    assert crashed.end_step == 1 and (tmp_path / "crash" / "last_state.pt").is_file()
    resumed = recipes.run_segment_label_matching(weaktr_file, clip, tmp_path / "crash", replace(options, resume="auto"))
    assert resumed.start_step == 1 and resumed.end_step == 2
    assert crashed.losses + resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    run_json = json.loads((tmp_path / "crash" / "run.json").read_text())
    assert run_json["stage"] == "a" and run_json["lambda_b"] == 2.4


def test_pseudo_masks_round_trip_and_bad_folders(weaktr_file, tmp_path, capsys):
    model = recipes.load_cam_model(weaktr_file)
    out = recipes.write_pseudo_masks(model, tmp_path / "pm", length=6, crf="auto")
    if not recipes.crf_available():
        assert "dense CRF skipped" in capsys.readouterr().out
    data = PseudoMaskDataset(out, num_classes=9)
    assert len(data) == 6 and data[0]["mask"].shape == (64, 64) and int(data[0]["mask"].max()) < 9
    with pytest.raises(ValueError, match="exists"):
        recipes.write_pseudo_masks(model, out, length=6, crf="off")
    with pytest.raises(ValueError, match="have 9 classes but the model has 12"):
        PseudoMaskDataset(out, num_classes=12)
    first = out / "000000.png"
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(first)
    with pytest.raises(ValueError, match="000000.png is 64x32 .* but the images are 64x64"):
        PseudoMaskDataset(out)
    Image.fromarray(np.full((64, 64), 17, np.uint8)).save(first)
    with pytest.raises(ValueError, match="holds id 17"):
        PseudoMaskDataset(out)
    (out / "meta.json").unlink()
    with pytest.raises(ValueError, match="meta.json is missing"):
        PseudoMaskDataset(out)


@pytest.mark.skipif(not recipes.crf_available(), reason="needs pydensecrf (pip install 'fastseg[crf]')")
def test_dense_crf_snaps_a_noisy_label_map_to_the_image_edges():
    """A flat square on a flat background: the CRF removes labels that cross the colour edge."""
    rng = np.random.default_rng(0)
    image = np.full((48, 48, 3), 30, np.uint8)
    image[12:36, 12:36] = (220, 40, 40)
    truth = np.zeros((48, 48), np.uint8)
    truth[12:36, 12:36] = 1
    noisy = truth.copy()
    noisy[9:39, 9:39] = 1  # the mask bleeds 3 pixels past the edge
    flips = rng.random((48, 48)) < 0.05
    noisy[flips] = 1 - noisy[flips]
    refined = recipes.dense_crf(image, noisy, num_classes=2)
    assert refined.shape == truth.shape and refined.dtype == np.uint8
    assert (refined != truth).mean() < 0.5 * (noisy != truth).mean()


def test_crf_on_without_a_package_is_an_error(monkeypatch):
    monkeypatch.setattr(recipes, "crf_available", lambda: False)
    with pytest.raises(ValueError, match="dense CRF requested but unavailable"):
        recipes._resolve_crf("on")


def test_weak_label_space_never_shows_pixel_labels_to_training():
    train = WeakShapes("train", length=16)
    for i in range(16):
        sample = train[i]
        assert "mask" not in sample and sample["image_labels"].sum() >= 1
    evaluation = WeakShapes("train", length=4, with_masks=True)
    world = ShapesDataset("train", length=4)
    sample, raw = evaluation[0], world[evaluation[0]["index"]]
    assert torch.equal(sample["mask"], to_weak_mask(raw["mask"]))
    assert sample["image_labels"].tolist() == [float((sample["mask"] == k).any()) for k in range(1, 9)]


def test_recipe_crop_rarely_cuts_a_labelled_shape_out():
    """The random-resized crop must keep the image-level labels true: run on indicator images of each labelled
    shape (one image per (image, class) pair), the recipe's crop leaves no pixel of the shape in under 3 % of the
    pairs on the shapes world (the ImageNet-style area floor 0.5 cut out 6.5 % of them)."""
    data = WeakShapes("train", length=256, with_masks=True)
    indicators = []
    for i in range(len(data)):
        sample = data[i]
        for k in sample["image_labels"].nonzero().flatten().tolist():
            indicators.append((sample["mask"] == k + 1).float().expand(3, -1, -1))
    torch.manual_seed(0)
    kept = recipes.augment_batch(torch.stack(indicators), colour=False)[:, 0].flatten(1).amax(1) > 0
    assert len(indicators) > 400
    assert float((~kept).float().mean()) < 0.03


def test_captions_name_things_colours_and_textures():
    world = ShapesDataset("train", length=8)
    names = world.config.class_names
    for i in range(8):
        sample = world[i]
        text = caption(sample)
        assert text.startswith("a photo of ") and text.endswith(".")
        present = {names[k] for k in sample["mask"].unique().tolist() if k != 255}
        for name in present:
            assert name in text
        variants = caption_variants(sample)
        assert variants[0] == text and all(v.startswith("a photo of ") for v in variants)


def test_clip_retrieval_metrics_are_fractions():
    out = clip_retrieval_accuracy(build_clip(), CaptionedShapes("val", length=8))
    for key in ("image_to_text_top1", "text_to_image_top1", "zero_shot_shape_top1"):
        assert 0.0 <= out[key] <= 1.0
    assert out["num_images"] == 8


def test_cli_flags_become_run_options():
    """Runs (a), (b), (c) take one `RunOptions`; the CLI's flags and defaults map onto it field by field."""
    from fastseg.cli.main import build_parser
    from fastseg.cli.semples import _run_options

    parse = build_parser().parse_args
    assert _run_options(parse(["semples", "match", "--out", "o", "--weaktr", "w"])) == recipes.RunOptions()
    args = parse(
        ["semples", "refine", "--out", "o", "--weaktr", "w", "--prompts", "p", "--steps", "7", "--batch-size", "3"]
        + ["--lr", "1e-4", "--seed", "1", "--train-length", "9", "--save-every", "2", "--resume", "none"]
        + ["--device", "cpu", "--model", "weaktr_shapes_clip", "--lambda-b", "1", "--lambda-p", "2", "--lambda-r", "3"]
    )
    assert _run_options(args) == recipes.RunOptions(
        steps=7,
        batch_size=3,
        lr=1e-4,
        seed=1,
        train_length=9,
        save_every=2,
        resume=None,
        device="cpu",
        model_name="weaktr_shapes_clip",
        lambda_b=1.0,
        lambda_p=2.0,
        lambda_r=3.0,
    )


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    """clip train -> semples weaktr -> match -> prompts -> refine -> evaluate -> pseudo-masks -> train --pseudo-masks."""
    from fastseg.cli import main

    d = str(tmp_path)
    tiny = ["--steps", "2", "--batch-size", "4", "--train-length", "8", "--save-every", "1"]
    assert main(["clip", "train", "--out", f"{d}/clip", *tiny]) == 0
    clip = ["--clip-checkpoint", f"{d}/clip/model.safetensors"]
    assert main(["semples", "weaktr", "--out", f"{d}/w", *tiny]) == 0
    assert main(["semples", "match", "--out", f"{d}/a", "--weaktr", f"{d}/w/model.safetensors", *clip, *tiny]) == 0
    assert main(["semples", "prompts", "--out", f"{d}/b", "--stage-a", f"{d}/a/model.safetensors", *clip, *tiny]) == 0
    assert (
        main(
            [
                "semples",
                "refine",
                "--out",
                f"{d}/c",
                "--weaktr",
                f"{d}/w/model.safetensors",
                "--prompts",
                f"{d}/b/model.safetensors",
                *clip,
                *tiny,
            ]
        )
        == 0
    )
    assert (
        main(["semples", "evaluate", "--cam", f"{d}/c/model.safetensors", "--length", "8", "--json", f"{d}/eval.json"])
        == 0
    )
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["fixed_mIoU"] <= 1
    assert (
        main(
            [
                "semples",
                "pseudo-masks",
                "--cam",
                f"{d}/c/model.safetensors",
                "--length",
                "8",
                "--out",
                f"{d}/pm",
                "--crf",
                "off",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "fpn_resnet18",
                "--pseudo-masks",
                f"{d}/pm",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--val-length",
                "4",
                "--out",
                f"{d}/seg",
                "--warmup-steps",
                "0",
            ]
        )
        == 0
    )
    # a CLIP run without weights is refused before training
    assert main(["semples", "match", "--out", f"{d}/x", "--weaktr", f"{d}/w/model.safetensors", *tiny]) == 2
