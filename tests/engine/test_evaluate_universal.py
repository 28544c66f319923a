"""evaluate_universal end to end with an oracle model that predicts the ground truth: PQ = SQ = RQ = 1 and
mask AP = 1 prove that the panoptic and instance ground truth built from shapes samples line up with what the
metrics expect; a model that predicts nothing gets PQ 0 and AP 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastseg.data.shapes import ShapesConfig, ShapesDataset, panoptic_map, pretrained_cfg_fields
from fastseg.engine.evaluate_universal import evaluate_universal, instance_targets
from fastseg.registry import PretrainedCfg


class _Oracle(nn.Module):
    """Looks the images up in the dataset and answers with their ground truth (or with nothing)."""

    def __init__(self, dataset: ShapesDataset, empty: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.dataset, self.empty = dataset, empty
        self.pretrained_cfg = PretrainedCfg.from_dict(pretrained_cfg_fields(dataset.config))
        self.lookup = {dataset[i]["image"].sum().item(): i for i in range(len(dataset))}

    def _samples(self, images):
        return [self.dataset[self.lookup[img.sum().item()]] for img in images]

    def predict(self, images, task="semantic"):
        samples = self._samples(images)
        batch = torch.utils.data.default_collate(samples)
        if task == "panoptic":
            pan = panoptic_map(batch["mask"], batch["instances"])
            return torch.full_like(pan, -1) if self.empty else pan
        targets = instance_targets(batch, self.pretrained_cfg.thing_classes)
        out = []
        for t in targets:
            keep = slice(0, 0) if self.empty else slice(None)
            out.append(
                {
                    "masks": t["masks"][keep],
                    "labels": t["labels"][keep],
                    "scores": torch.ones(t["labels"][keep].numel()),
                }
            )
        return out


@pytest.fixture(scope="module")
def dataset():
    return ShapesDataset("val", length=6, config=ShapesConfig(image_size=32))


def test_oracle_scores_perfectly(dataset):
    out = evaluate_universal(_Oracle(dataset), dataset, batch_size=4, subsets={"seen": dataset.config.seen_ids})
    pq, ap = out["panoptic"], out["instance"]
    assert pq["PQ"] == pytest.approx(1.0) and pq["SQ"] == pytest.approx(1.0) and pq["RQ"] == pytest.approx(1.0)
    assert pq["seen"]["PQ"] == pytest.approx(1.0)
    assert ap["AP"] == pytest.approx(1.0) and ap["AP75"] == pytest.approx(1.0)


def test_empty_predictions_score_zero(dataset):
    out = evaluate_universal(_Oracle(dataset, empty=True), dataset, batch_size=4)
    assert out["panoptic"]["PQ"] == 0.0 and out["instance"]["AP"] == 0.0
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate_universal(_Oracle(dataset), dataset, tasks=("depth",))
