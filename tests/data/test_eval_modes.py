"""Evaluation modes on every fixture: an oracle that reads the ground truth off the image scores mIoU 1.0 in every
mode, and one whose answer is mirrored or shifted does not (so the checks can fail)."""

from __future__ import annotations

import pytest
import torch

from fastseg.data import EvalProtocol, build_dataset
from fastseg.data.transforms import MS_RATIOS
from fastseg.engine import evaluate
from fastseg.engine.evaluate import resolve_protocol
from fastseg.engine.inference import predict_image, slide_logits

SEMANTIC = ["ade20k", "cityscapes", "voc", "coco_stuff", "coco_panoptic"]

# Modes at sizes the fixtures (64 x 96 / 64 x 128 images of 8-pixel blocks) exercise: a resize to twice the size, a
# sliding window that needs several overlapping windows and a shrunken last one, and scales 0.5 / 1 / 2 with flips.
MODES = {
    "whole": EvalProtocol(),
    "whole_resized": EvalProtocol(mode="whole", scale=(256, 128)),
    "slide": EvalProtocol(mode="slide", crop_size=(40, 56), stride=(24, 40)),
    "ms_flip": EvalProtocol(mode="whole", ratios=(0.5, 1.0, 2.0), flip=True),
    "slide_ms_flip": EvalProtocol(mode="slide", crop_size=(40, 56), stride=(24, 40), ratios=(0.5, 1.0, 2.0), flip=True),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", SEMANTIC)
def test_oracle_scores_miou_one_in_every_mode(datasets_on_disk, oracle_for, name, mode):
    fixture = datasets_on_disk[name]
    ds = build_dataset(name, fixture.root, "val", transform=None)
    metrics = evaluate(oracle_for(fixture), ds, progress=False, protocol=MODES[mode])
    assert metrics["mIoU"] == 1.0 and metrics["aAcc"] == 1.0
    assert metrics["num_pixels"] == sum(int((ds[j]["mask"] != 255).sum()) for j in range(len(ds)))


@pytest.mark.parametrize("name", ["cityscapes", "voc"])
def test_oracle_scores_miou_one_under_the_dataset_protocol(datasets_on_disk, oracle_for, name):
    """The per-dataset defaults themselves (Cityscapes: 768 x 768 slide; VOC: whole image resized into 2048 x 512,
    here 8x), single scale and with mmseg's six scales and flips."""
    fixture = datasets_on_disk[name]
    ds = build_dataset(name, fixture.root, "val", transform=None)
    assert resolve_protocol(ds, None) == ds.eval_protocol
    oracle = oracle_for(fixture)
    assert evaluate(oracle, ds, progress=False)["mIoU"] == 1.0
    if name == "cityscapes":  # six scales of a 768-pixel slide over 64 x 128 images stay small
        ms = resolve_protocol(ds, "ms_flip")
        assert ms.ratios == MS_RATIOS and ms.flip and ms.mode == "slide"
        assert evaluate(oracle, ds, progress=False, protocol="ms_flip")["mIoU"] == 1.0


def test_zero_shot_summary_seen_unseen_harmonic(datasets_on_disk, oracle_for):
    fixture = datasets_on_disk["coco_stuff"]
    ds = build_dataset("coco_stuff", fixture.root, "val", transform=None, unseen="pading")
    oracle = oracle_for(fixture)
    stored = EvalProtocol()  # at the stored size: the default resize into (2048, 512) only costs time here
    metrics = evaluate(oracle, ds, progress=False, protocol=stored)
    assert metrics["mIoU_seen"] == metrics["mIoU_unseen"] == metrics["hIoU"] == 1.0

    class SeenOnly(torch.nn.Module):  # never predicts an unseen class: unseen IoU 0, so hIoU 0
        def __init__(self):
            super().__init__()
            self.pretrained_cfg = oracle.pretrained_cfg

        def forward(self, images):
            logits = oracle(images)
            logits[:, list(ds.unseen_classes)] = -1e4
            return logits

        def predict(self, images):
            return self(images).argmax(1)

    metrics = evaluate(SeenOnly(), ds, progress=False, protocol=stored)
    assert metrics["mIoU_unseen"] == 0.0 and metrics["hIoU"] == 0.0 and 0.0 < metrics["mIoU_seen"] < 1.0
    plain = build_dataset("coco_stuff", fixture.root, "val", transform=None)
    assert "hIoU" not in evaluate(oracle, plain, progress=False, protocol=stored)


class _Mirrored(torch.nn.Module):
    """The oracle with its logits mirrored left-right: right only where the image happens to be symmetric."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle
        self.pretrained_cfg = oracle.pretrained_cfg

    def forward(self, images):
        return self.oracle(images).flip(-1)

    def predict(self, images):
        return self(images).argmax(1)


@pytest.mark.parametrize("mode", ["whole", "slide", "ms_flip"])
def test_a_wrong_model_scores_below_one(datasets_on_disk, oracle_for, mode):
    fixture = datasets_on_disk["ade20k"]
    ds = build_dataset("ade20k", fixture.root, "val", transform=None)
    metrics = evaluate(_Mirrored(oracle_for(fixture)), ds, progress=False, protocol=MODES[mode])
    assert metrics["mIoU"] < 0.9


def test_sliding_windows_cover_every_pixel_once_per_window():
    calls = []

    class Counter(torch.nn.Module):
        def forward(self, images):
            calls.append(tuple(images.shape[-2:]))
            return torch.ones(images.shape[0], 2, *images.shape[-2:])

    logits = slide_logits(Counter(), torch.zeros(1, 3, 64, 128), crop_size=(40, 56), stride=(24, 40))
    # mmseg's grid: rows = ceil((64 - 40) / 24) + 1 = 2, cols = ceil((128 - 56) / 40) + 1 = 3; all windows full size.
    assert calls == [(40, 56)] * 6
    assert torch.allclose(logits, torch.ones_like(logits))  # averaged where windows overlap
    calls.clear()
    slide_logits(Counter(), torch.zeros(1, 3, 30, 20), crop_size=(40, 56), stride=(24, 40))
    assert calls == [(30, 20)]  # a window larger than the image shrinks to it


def test_plain_protocol_is_model_predict(datasets_on_disk, oracle_for):
    fixture = datasets_on_disk["voc"]
    ds = build_dataset("voc", fixture.root, "val", transform=None)
    oracle = oracle_for(fixture)
    image = ds[0]["image"][None]
    assert torch.equal(predict_image(oracle, image, EvalProtocol()), oracle.predict(image))


def test_protocol_validation():
    with pytest.raises(ValueError, match="needs crop_size and stride"):
        EvalProtocol(mode="slide")
    with pytest.raises(ValueError, match="larger than crop_size"):
        EvalProtocol(mode="slide", crop_size=(32, 32), stride=(48, 16))
    with pytest.raises(ValueError, match="mode must be"):
        EvalProtocol(mode="tiles")
    with pytest.raises(ValueError, match="ratios must be positive"):
        EvalProtocol(ratios=(0.0,))
    with pytest.raises(ValueError, match="no default sliding-window"):
        EvalProtocol().with_mode("slide")
