"""PADing end to end on a tiny budget: seen-only stage 1, stage 2 with a frozen segmenter, inference with new_fc,
zero-shot evaluation, and the bad inputs that must fail before any training step."""

import json

import pytest
import torch

import fastseg
from fastseg.checkpoint import read_metadata, save_weights
from fastseg.data.shapes import ShapesDataset, zero_shot_config
from fastseg.engine import TrainConfig, train
from fastseg.engine.recipes.pading import (
    Stage2Config,
    evaluate_zero_shot,
    format_zero_shot,
    harmonic_mean,
    mark_seen_only,
    seen_only_dataset,
    train_stage2,
)
from fastseg.models.pading import PADing

WORLD = zero_shot_config(image_size=32)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A seen-only Mask2Former after 2 steps (the protocol, not the quality, is under test)."""
    out = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    seg = fastseg.create_model("mask2former_resnet18", num_classes=WORLD.num_classes)
    mark_seen_only(seg, "panoptic", WORLD.unseen_ids)
    data = seen_only_dataset(WORLD, "panoptic", length=8)
    train(seg, data, TrainConfig(steps=2, batch_size=2, out_dir=str(out), progress=False, device="cpu"))
    return out / "model.safetensors"


def test_seen_only_datasets_follow_the_protocols():
    panoptic = seen_only_dataset(WORLD, "panoptic", length=16)
    semantic = seen_only_dataset(WORLD, "semantic", length=16)
    unseen = torch.tensor(WORLD.unseen_ids)
    for i in range(16):
        assert not torch.isin(panoptic[i]["mask"], unseen).any()  # images with unseen classes never appear
        assert not torch.isin(semantic[i]["mask"], unseen).any()  # unseen pixels ignored
    assert semantic.unseen == "ignore" and panoptic.unseen == "exclude"
    with pytest.raises(ValueError, match="no unseen class"):
        seen_only_dataset(zero_shot_config(unseen_classes=()), "panoptic")


def test_registered_model_and_split():
    model = fastseg.create_model("pading_resnet18")
    assert isinstance(model, PADing)
    assert [model.pretrained_cfg.class_names[c] for c in model.unseen_classes] == ["snow", "ellipse", "diamond"]
    assert model.head.class_embeddings.shape[0] == WORLD.num_classes
    assert model.segmenter.class_head is model.head.new_fc  # inference goes through new_fc
    assert all(not p.requires_grad for n, p in model.segmenter.named_parameters() if "class_embed" not in n)
    with pytest.raises(ValueError, match="no unseen class"):
        fastseg.create_model("pading_resnet18", unseen_classes=[])
    with pytest.raises(ValueError, match="no seen class"):
        fastseg.create_model("pading_resnet18", unseen_classes=list(range(WORLD.num_classes)))


def test_stage1_metadata_and_bad_stage2_sources(stage1, tmp_path):
    meta = read_metadata(stage1)
    assert json.loads(meta["zero_shot_protocol"])["unseen_classes"] == sorted(WORLD.unseen_ids)
    model = fastseg.create_model("pading_resnet18")
    model.load_stage1(stage1)
    torch.testing.assert_close(model.head.new_fc.weight, model.stage1_class_head.weight)
    # A Mask2Former that saw unseen classes (no protocol in its metadata) is refused before any step.
    plain = fastseg.create_model("mask2former_resnet18", num_classes=WORLD.num_classes)
    save_weights(plain, tmp_path / "plain.safetensors", {"architecture": "mask2former_resnet18"})
    with pytest.raises(ValueError, match="not a seen-only Mask2Former"):
        model.load_stage1(tmp_path / "plain.safetensors")
    # A different architecture is refused by name.
    save_weights({"w": torch.zeros(1)}, tmp_path / "fpn.safetensors", {"architecture": "fpn_resnet18"})
    with pytest.raises(ValueError, match="'fpn_resnet18' checkpoint"):
        model.load_stage1(tmp_path / "fpn.safetensors")
    # Seen-only on a different split.
    other = fastseg.create_model("mask2former_resnet18", num_classes=WORLD.num_classes)
    mark_seen_only(other, "panoptic", [11])
    save_weights(other, tmp_path / "other.safetensors", other.checkpoint_metadata)
    with pytest.raises(ValueError, match="unseen classes \\[11\\]"):
        model.load_stage1(tmp_path / "other.safetensors")


def test_stage2_trains_only_the_head_and_inference_uses_new_fc(stage1, tmp_path):
    torch.manual_seed(0)
    model = fastseg.create_model("pading_resnet18")
    model.load_stage1(stage1)
    seg_before = {k: v.clone() for k, v in model.segmenter.state_dict().items() if "class_embed" not in k}
    gen_before = model.head.generator.layers[0].linear1.weight.clone()
    fc_before = model.head.new_fc.weight.clone()
    data = seen_only_dataset(WORLD, "panoptic", length=8)
    result = train_stage2(model, data, Stage2Config(steps=3, batch_size=2, log_every=1, out_dir=str(tmp_path)))
    assert result.steps == 3 and len(result.history) == 3
    for key, value in model.segmenter.state_dict().items():  # weights and BatchNorm statistics untouched
        if "class_embed" not in key:
            torch.testing.assert_close(value, seg_before[key], rtol=0, atol=0, msg=key)
    assert all(p.grad is None for n, p in model.segmenter.named_parameters() if "class_embed" not in n)
    assert not torch.equal(model.head.generator.layers[0].linear1.weight, gen_before)
    assert not torch.equal(model.head.new_fc.weight, fc_before)
    assert set(result.history[-1]) >= {"mmd", "cls", "align", "unrelated", "relation", "rec", "classifier_loss"}
    meta = read_metadata(tmp_path / "model.safetensors")
    assert meta["stage"] == "2" and json.loads(meta["unseen_classes"]) == list(WORLD.unseen_ids)
    # Reload the stage-2 weights into a fresh model: same predictions.
    fresh = fastseg.create_model("pading_resnet18", checkpoint_path=tmp_path / "model.safetensors").eval()
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))
    # Inference reads new_fc: a large bias on one class makes every pixel that class.
    with torch.no_grad():
        model.head.new_fc.bias.zero_()
        model.head.new_fc.bias[12] = 50.0
    assert (model.predict(x, task="semantic") == 12).all()


def test_zero_shot_evaluation_reports_seen_unseen_harmonic(stage1):
    model = fastseg.create_model("pading_resnet18")
    model.load_stage1(stage1)
    data = ShapesDataset("val", length=4, config=WORLD)
    metrics = evaluate_zero_shot(model, data, batch_size=4)
    for task, name in (("semantic", "mIoU"), ("panoptic", "PQ"), ("panoptic", "RQ"), ("instance", "AP50")):
        for side in ("seen", "unseen", "harmonic"):
            assert f"{name}_{side}" in metrics[task]
    table = format_zero_shot(metrics)
    assert "PQ (panoptic)" in table and "AP50 (instance)" in table
    assert harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_stage2_refuses_a_model_with_trainable_segmenter():
    model = fastseg.create_model("pading_resnet18")
    model.segmenter.backbone.requires_grad_(True)
    with pytest.raises(ValueError, match="must be frozen"):
        train_stage2(model, seen_only_dataset(WORLD, "panoptic", length=2), Stage2Config(steps=1, batch_size=1))
