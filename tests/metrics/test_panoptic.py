"""PanopticQuality against two independent peers: torchmetrics' PanopticQuality (random maps, no crowd) and the
panopticapi ``pq_compute`` formula re-written here in its own dictionary style (random maps with crowd and void),
plus hand-made cases whose PQ is worked out in the comments, and every bad input of the issue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastseg.metrics import PanopticQuality

DIV = 1000
THINGS, STUFFS = (2, 3, 4), (0, 1)


def _pan(cls, inst=0):
    return cls * DIV + inst


def _random_maps(seed: int, n: int = 3, size: int = 24, crowd: bool = False, pred_void: bool = True):
    """Ground truth and a perturbed prediction: blocks of stuff and things, some void, some crowd."""
    rng = np.random.default_rng(seed)
    gts, preds, crowds = [], [], []
    for _ in range(n):
        gt = np.full((size, size), _pan(int(rng.integers(2))), np.int64)
        gt[:, size // 2 :] = _pan(int(rng.integers(2)))
        crowd_ids = set()
        for i in range(1, int(rng.integers(2, 7))):
            cls = int(rng.choice(THINGS))
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(3, 9, 2)
            gt[y : y + h, x : x + w] = _pan(cls, i)
            if crowd and rng.random() < 0.25:
                crowd_ids.add(_pan(cls, i))
        gt[rng.random((size, size)) < 0.05] = -1  # scattered void
        pred = gt.copy()
        pred[pred < 0] = _pan(0)
        # shift some segments, relabel one, drop one to void, add a spurious thing
        pred = np.roll(pred, int(rng.integers(-2, 3)), axis=int(rng.integers(2)))
        ids = [i for i in np.unique(pred) if i % DIV]
        if ids:
            pred[pred == ids[0]] = _pan(int(rng.choice(THINGS)), 50)
        if len(ids) > 1:
            pred[pred == ids[1]] = -1 if pred_void else _pan(1)
        y, x = rng.integers(0, size - 5, 2)
        pred[y : y + 5, x : x + 5] = _pan(int(rng.choice(THINGS)), 77)
        gts.append(gt)
        preds.append(pred)
        crowds.append(crowd_ids)
    return np.stack(preds), np.stack(gts), crowds


def _panopticapi_formula(preds, gts, crowds):
    """panopticapi's pq_compute_single_core, restated: dict of segments, dict of pair intersections, per-category
    tp / fp / fn / iou; then pq_average over categories with tp + fp + fn > 0."""
    stats = {c: [0.0, 0, 0, 0] for c in THINGS + STUFFS}
    for pred, gt, crowd in zip(preds, gts, crowds):
        gt_segms = {
            int(i): {"cat": int(i) // DIV, "area": int((gt == i).sum()), "crowd": int(i) in crowd}
            for i in np.unique(gt)
            if i >= 0
        }
        pred_segms = {int(i): {"cat": int(i) // DIV, "area": int((pred == i).sum())} for i in np.unique(pred) if i >= 0}
        offset = 1 << 40
        pairs = (gt.astype(np.int64) + 1) * offset + (pred.astype(np.int64) + 1)
        inter = {}
        for label, count in zip(*np.unique(pairs, return_counts=True)):
            inter[(int(label // offset) - 1, int(label % offset) - 1)] = int(count)
        gt_matched, pred_matched = set(), set()
        for (g, p), area in inter.items():
            if g not in gt_segms or p not in pred_segms or gt_segms[g]["crowd"]:
                continue
            if gt_segms[g]["cat"] != pred_segms[p]["cat"]:
                continue
            union = pred_segms[p]["area"] + gt_segms[g]["area"] - area - inter.get((-1, p), 0)
            iou = area / union
            if iou > 0.5:
                stats[gt_segms[g]["cat"]][0] += iou
                stats[gt_segms[g]["cat"]][1] += 1
                gt_matched.add(g)
                pred_matched.add(p)
        crowd_by_cat = {}
        for g, info in gt_segms.items():
            if g in gt_matched:
                continue
            if info["crowd"]:
                crowd_by_cat.setdefault(info["cat"], []).append(g)
                continue
            stats[info["cat"]][3] += 1
        for p, info in pred_segms.items():
            if p in pred_matched:
                continue
            covered = inter.get((-1, p), 0) + sum(inter.get((g, p), 0) for g in crowd_by_cat.get(info["cat"], []))
            if covered / info["area"] > 0.5:
                continue
            stats[info["cat"]][2] += 1

    def average(classes):
        vals = [
            (
                s[0] / (s[1] + 0.5 * s[2] + 0.5 * s[3]),
                s[0] / s[1] if s[1] else 0.0,
                s[1] / (s[1] + 0.5 * s[2] + 0.5 * s[3]),
            )
            for c in classes
            for s in [stats[c]]
            if s[1] + s[2] + s[3]
        ]
        return tuple(float(np.mean([v[i] for v in vals])) for i in range(3))

    return average(THINGS + STUFFS), average(THINGS), average(STUFFS)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("crowd", [False, True])
def test_matches_panopticapi_formula_on_random_maps(seed, crowd):
    preds, gts, crowds = _random_maps(seed, crowd=crowd)
    metric = PanopticQuality(THINGS, STUFFS, DIV)
    metric.update(torch.from_numpy(preds), torch.from_numpy(gts), crowd=crowds)
    res = metric.compute()
    (pq, sq, rq), things, stuff = _panopticapi_formula(preds, gts, crowds)
    assert res["PQ"] == pytest.approx(pq, abs=1e-12) and res["SQ"] == pytest.approx(sq, abs=1e-12)
    assert res["RQ"] == pytest.approx(rq, abs=1e-12)
    assert res["things"]["PQ"] == pytest.approx(things[0], abs=1e-12)
    assert res["stuff"]["PQ"] == pytest.approx(stuff[0], abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_matches_torchmetrics_on_random_maps(seed):
    from torchmetrics.detection import PanopticQuality as TMPanopticQuality

    # torchmetrics treats *predicted* void like ground-truth void (it also leaves target pixels under predicted
    # void out of the union and drops mostly-void-covered ground truth from the false negatives); COCO's
    # panopticapi does neither, and PanopticQuality follows COCO. So this peer gets predictions without void.
    preds, gts, _ = _random_maps(seed + 10, pred_void=False)
    void = (1 + max(THINGS + STUFFS), 0)

    def to_pairs(maps):  # (B, H, W) panoptic ids -> torchmetrics' (B, H, W, 2) (category, instance)
        t = torch.from_numpy(maps)
        out = torch.stack([t // DIV, t % DIV], dim=-1)
        out[t < 0] = torch.tensor(void)
        return out

    peer = TMPanopticQuality(
        things=set(THINGS), stuffs=set(STUFFS), return_sq_and_rq=True, allow_unknown_preds_category=True
    )  # void predictions
    peer.update(to_pairs(preds), to_pairs(gts))
    pq_tm, sq_tm, rq_tm = peer.compute().tolist()
    metric = PanopticQuality(THINGS, STUFFS, DIV)
    metric.update(torch.from_numpy(preds), torch.from_numpy(gts))
    res = metric.compute()
    assert res["PQ"] == pytest.approx(pq_tm, abs=1e-6)
    assert res["SQ"] == pytest.approx(sq_tm, abs=1e-6)
    assert res["RQ"] == pytest.approx(rq_tm, abs=1e-6)


def test_hand_made_case():
    # 1 x 10 image. GT: stuff 0 on pixels 0-3, thing 2 (inst 1) on 4-7, void on 8-9.
    # Pred: stuff 0 on 0-2 (IoU 3/4, TP), thing 2 on 3-9: |p| = 7, |g| = 4, |p & g| = 4, |p & void| = 2,
    # union = 7 + 4 - 4 - 2 = 5, IoU 4/5 (TP). PQ_0 = 0.75, PQ_2 = 0.8; PQ = 0.775, SQ = 0.775, RQ = 1.
    gt = torch.tensor([[[0, 0, 0, 0, 2001, 2001, 2001, 2001, -1, -1]]])
    pred = torch.tensor([[[0, 0, 0, 2005, 2005, 2005, 2005, 2005, 2005, 2005]]])
    metric = PanopticQuality(THINGS, STUFFS, DIV)
    metric.update(pred, gt)
    res = metric.compute()
    assert res["PQ"] == pytest.approx(0.775) and res["SQ"] == pytest.approx(0.775) and res["RQ"] == 1.0
    assert res["per_class"][0]["PQ"] == pytest.approx(0.75) and res["per_class"][2]["PQ"] == pytest.approx(0.8)
    assert res["things"]["PQ"] == pytest.approx(0.8) and res["stuff"]["PQ"] == pytest.approx(0.75)
    sub = metric.compute({"seen": [0], "unseen": [2, 3]})
    assert sub["seen"]["PQ"] == pytest.approx(0.75) and sub["unseen"]["PQ"] == pytest.approx(0.8)


def test_crowd_and_void_cases():
    # GT: thing 2 crowd on 0-4, thing 2 (inst 2) on 5-7, stuff 1 on 8-9.
    # Pred A: thing 2 on 0-3 (on the crowd region): neither TP nor FP. Pred B: thing 3 on 5-7: FP for class 3,
    # FN for the GT thing of class 2. Pred: stuff 1 on 8-9: TP IoU 1.
    gt = torch.tensor([[2001, 2001, 2001, 2001, 2001, 2002, 2002, 2002, 1000, 1000]])
    pred = torch.tensor([[2009, 2009, 2009, 2009, -1, 3001, 3001, 3001, 1000, 1000]])
    metric = PanopticQuality(THINGS, STUFFS, DIV)
    metric.update(pred, gt, crowd=[2001])
    stats = metric.compute()["per_class"]
    assert stats[2] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "TP": 0, "FP": 0, "FN": 1}
    assert stats[3]["FP"] == 1 and stats[1]["PQ"] == 1.0
    # without the crowd flag the prediction on it is a TP (IoU 4/5)
    metric = PanopticQuality(THINGS, STUFFS, DIV)
    metric.update(pred, gt)
    assert metric.compute()["per_class"][2]["TP"] == 1


def test_empty_prediction_counts_every_segment_as_missed():
    gt = torch.tensor([[[0, 0, 2001, 2001]]])
    metric = PanopticQuality(THINGS, STUFFS, DIV)
    metric.update(torch.full_like(gt, -1), gt)
    res = metric.compute()
    assert res["PQ"] == 0.0 and res["per_class"][0]["FN"] == 1 and res["per_class"][2]["FN"] == 1


def test_merge_equals_single_pass():
    preds, gts, crowds = _random_maps(3, n=4, crowd=True)
    whole = PanopticQuality(THINGS, STUFFS, DIV)
    whole.update(torch.from_numpy(preds), torch.from_numpy(gts), crowd=crowds)
    a, b = PanopticQuality(THINGS, STUFFS, DIV), PanopticQuality(THINGS, STUFFS, DIV)
    a.update(torch.from_numpy(preds[:2]), torch.from_numpy(gts[:2]), crowd=crowds[:2])
    b.update(torch.from_numpy(preds[2:]), torch.from_numpy(gts[2:]), crowd=crowds[2:])
    assert torch.equal(a.merge(b).stats, whole.stats)


def test_bad_inputs_name_the_segment():
    metric = PanopticQuality(THINGS, STUFFS, DIV)
    with pytest.raises(ValueError, match="segment id 7001 decodes to class 7"):
        metric.update(torch.tensor([[0, 7001]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="target of image 0: segment id 9000"):
        metric.update(torch.tensor([[0, 0]]), torch.tensor([[0, 9000]]))
    with pytest.raises(ValueError, match="crowd segment 1000 is on stuff class 1"):
        metric.update(torch.tensor([[0, 1000]]), torch.tensor([[0, 1000]]), crowd=[1000])
    with pytest.raises(ValueError, match="does not match"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="overlap"):
        PanopticQuality([1, 2], [2])
