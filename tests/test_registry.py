"""Registry: names, patterns, errors, PretrainedCfg round trip, local-only pretrained weights."""

import pytest
import torch

import fastseg
from fastseg.registry import PretrainedCfg, default_palette


def test_list_models_patterns():
    names = fastseg.list_models()
    assert names == sorted(names) and "fpn_resnet18" in names
    assert fastseg.list_models("fpn_resnet*") == ["fpn_resnet101", "fpn_resnet18", "fpn_resnet50"]
    assert "fpn_resnet18" not in fastseg.list_models("fpn*", exclude="*resnet*")
    assert fastseg.list_models("no_such_*") == []


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'fpn_resnet81'.*fpn_resnet18"):
        fastseg.create_model("fpn_resnet81")


def test_num_classes_and_cfg():
    model = fastseg.create_model("fpn_resnet18", num_classes=5)
    cfg = model.pretrained_cfg
    assert cfg.num_classes == 5 and len(cfg.class_names) == 5 and len(cfg.palette) == 5
    assert model.model_name == "fpn_resnet18"
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5, 16, 16)


def test_pretrained_cfg_round_trip_and_validation():
    cfg = PretrainedCfg(num_classes=3, class_names=("a", "b", "c"), metrics={"mIoU": 0.5})
    again = PretrainedCfg.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="class names"):
        PretrainedCfg(num_classes=3, class_names=("a",))
    with pytest.raises(ValueError, match="ignore_index 1 is a class id"):
        PretrainedCfg(num_classes=3, ignore_index=1)
    assert len(set(default_palette(40))) == 40


def test_pretrained_without_local_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        fastseg.create_model("fpn_resnet18", pretrained=True)


def test_checkpoint_round_trip_through_create_model(tmp_path):
    from fastseg.checkpoint import save_weights

    model = fastseg.create_model("fpn_mit_b0", num_classes=4).eval()
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    again = fastseg.create_model("fpn_mit_b0", num_classes=4, checkpoint_path=path).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError):  # 4-class weights into a 6-class model: shapes do not fit
        fastseg.create_model("fpn_mit_b0", num_classes=6, checkpoint_path=path)
    with pytest.raises(FileNotFoundError):
        fastseg.create_model("fpn_mit_b0", num_classes=4, checkpoint_path=tmp_path / "missing.safetensors")


def test_shrunk_configurations_are_tagged_and_say_what_differs():
    tagged = fastseg.create_model("ecenet_resnet18.shapes_small", num_classes=4)
    plain = fastseg.create_model("ecenet_resnet18", num_classes=4)
    assert tagged.model_name == plain.model_name == "ecenet_resnet18"
    assert tagged.pretrained_cfg.tag == plain.pretrained_cfg.tag == "shapes_small"
    assert "128" in tagged.pretrained_cfg.differs_from_paper and "256" in tagged.pretrained_cfg.differs_from_paper
    assert tagged.channels == plain.channels == 128
    assert "DALL-E" in fastseg.registry.model_tag("gss_ff_resnet18")[1]
    assert fastseg.registry.model_tag("ecenet_resnet50") == ("", "")  # follows the paper: no tag
    assert fastseg.is_model("fpn_resnet18.shapes_small") and not fastseg.is_model("fpn_resnet50.shapes_small")
    with pytest.raises(ValueError, match="unknown tag 'paper' of model 'ecenet_resnet18'"):
        fastseg.create_model("ecenet_resnet18.paper")
    with pytest.raises(ValueError, match="unknown tag 'shapes_small' of model 'ecenet_resnet50': it has no tags"):
        fastseg.create_model("ecenet_resnet50.shapes_small")
    cfg = tagged.pretrained_cfg
    assert PretrainedCfg.from_dict(cfg.to_dict()) == cfg  # the new fields travel into checkpoints and sidecars


def test_register_model_rejects_a_tag_without_its_difference():
    with pytest.raises(ValueError, match="needs both tag and differs_from_paper"):
        fastseg.register_model(tag="small")
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        fastseg.register_model(tag="a.b", differs_from_paper="x")


def test_default_palette_keeps_base_colours_then_stays_distinct():
    base = ((1, 2, 3), (4, 5, 6))
    palette = default_palette(30, base)
    assert palette[:2] == base and len(set(palette)) == 30
    assert default_palette(1, base) == ((1, 2, 3),)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        default_palette(-1)
