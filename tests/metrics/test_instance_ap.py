"""InstanceAP (pycocotools COCOeval, segm) on hand-made cases whose AP is computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from fastseg.metrics import InstanceAP


def _box(h0, h1, w0, w1, size=20):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[h0:h1, w0:w1] = True
    return m


def _pred(masks, scores, labels):
    return {"masks": torch.stack(masks), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def _gt(masks, labels, crowd=None):
    out = {"masks": torch.stack(masks), "labels": torch.tensor(labels)}
    if crowd is not None:
        out["iscrowd"] = torch.tensor(crowd)
    return out


def test_perfect_predictions_give_ap_1():
    gt = _gt([_box(0, 5, 0, 5), _box(10, 15, 10, 15)], [0, 1])
    metric = InstanceAP([0, 1])
    metric.update([_pred(list(gt["masks"]), [0.9, 0.8], [0, 1])], [gt])
    res = metric.compute()
    assert res["AP"] == pytest.approx(1.0) and res["AP50"] == pytest.approx(1.0) and res["AP75"] == pytest.approx(1.0)


def test_false_positive_ranked_first():
    # Two GT of class 0; detections: a false positive (score 0.9) then a hit (0.8). After the first detection
    # precision 0, after the second recall 1/2 with precision 1/2. Interpolated precision is 1/2 at the 51 recall
    # points 0.00..0.50 and 0 above: AP = 51 / 101 * 0.5 at every IoU threshold.
    gt = _gt([_box(0, 5, 0, 5), _box(10, 15, 10, 15)], [0, 0])
    metric = InstanceAP([0])
    metric.update([_pred([_box(5, 9, 0, 5), _box(0, 5, 0, 5)], [0.9, 0.8], [0, 0])], [gt])
    res = metric.compute({"only": [0]})
    expected = 51 / 101 * 0.5
    assert res["AP"] == pytest.approx(expected) and res["AP50"] == pytest.approx(expected)
    assert res["only"]["AP"] == pytest.approx(expected)


def test_iou_0_6_counts_at_three_of_ten_thresholds():
    # GT 10x10 = 100 px; prediction 10x6 inside it: IoU 60/100 = 0.6 >= thresholds 0.50, 0.55, 0.60 only:
    # AP = 3/10, AP50 = 1, AP75 = 0.
    metric = InstanceAP([0])
    metric.update([_pred([_box(0, 10, 0, 6)], [0.5], [0])], [_gt([_box(0, 10, 0, 10)], [0])])
    res = metric.compute()
    assert res["AP"] == pytest.approx(0.3) and res["AP50"] == pytest.approx(1.0) and res["AP75"] == pytest.approx(0.0)


def test_class_subsets_and_missing_predictions():
    # class 0 perfect (AP 1), class 1 never predicted (AP 0): overall 0.5; subsets report each.
    gt = _gt([_box(0, 5, 0, 5), _box(10, 15, 10, 15)], [0, 1])
    metric = InstanceAP([0, 1, 2])
    metric.update([_pred([_box(0, 5, 0, 5)], [0.9], [0])], [gt])
    res = metric.compute({"seen": [0], "unseen": [1, 2]})
    assert res["AP"] == pytest.approx(0.5)
    assert res["seen"]["AP"] == pytest.approx(1.0) and res["unseen"]["AP"] == pytest.approx(0.0)
    assert 2 not in res["per_class"]  # no ground truth of class 2: nothing to measure


def test_empty_prediction_everywhere_is_ap_0():
    metric = InstanceAP([0])
    empty = {
        "masks": torch.zeros(0, 20, 20, dtype=torch.bool),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.long),
    }
    metric.update([empty], [_gt([_box(0, 5, 0, 5)], [0])])
    assert metric.compute()["AP"] == pytest.approx(0.0)


def test_detection_on_crowd_region_is_ignored():
    # One real GT (hit, score 0.5) and one crowd GT covered by a detection with score 0.9: the crowd detection is
    # ignored (neither TP nor FP), so AP = 1.
    gt = _gt([_box(0, 5, 0, 5), _box(10, 20, 10, 20)], [0, 0], crowd=[False, True])
    metric = InstanceAP([0])
    metric.update([_pred([_box(0, 5, 0, 5), _box(12, 18, 12, 18)], [0.5, 0.9], [0, 0])], [gt])
    assert metric.compute()["AP"] == pytest.approx(1.0)


def test_merge_and_bad_inputs():
    gt = _gt([_box(0, 5, 0, 5)], [0])
    a, b = InstanceAP([0]), InstanceAP([0])
    a.update([_pred([_box(0, 5, 0, 5)], [0.9], [0])], [gt])
    b.update([_pred([_box(0, 5, 0, 3)], [0.9], [0])], [gt])
    assert len(a.merge(b).images) == 2 and 0 < a.compute()["AP"] < 1
    with pytest.raises(ValueError, match="class 3"):
        a.update([_pred([_box(0, 5, 0, 5)], [0.9], [3])], [gt])
    with pytest.raises(ValueError, match="no image"):
        InstanceAP([0]).compute()
    nan = InstanceAP([0])
    nan.update(
        [_pred([_box(0, 5, 0, 5)], [0.9], [0])],
        [{"masks": torch.zeros(0, 20, 20, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long)}],
    )
    assert math.isnan(nan.compute()["AP"])
