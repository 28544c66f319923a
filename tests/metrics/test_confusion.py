"""ConfusionMatrix: equality with an independent numpy computation and torchmetrics, NaN rules, bad input."""

import math
import os

import numpy as np
import pytest
import torch

from fastseg.metrics import ConfusionMatrix

SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)

IGNORE = 255


def _numpy_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = IGNORE) -> dict:
    """Per-class loops over boolean masks: deliberately a different algorithm from the bincount under test."""
    keep = target != ignore
    pred, target = pred[keep], target[keep]
    ious, accs = [], []
    for c in range(num_classes):
        p, t = pred == c, target == c
        inter, union = np.logical_and(p, t).sum(), np.logical_or(p, t).sum()
        ious.append(inter / union if union else np.nan)
        accs.append(inter / t.sum() if t.sum() else np.nan)
    ious, accs = np.array(ious, dtype=np.float64), np.array(accs, dtype=np.float64)
    freq = np.array([(target == c).sum() for c in range(num_classes)]) / target.size
    valid = ~np.isnan(ious)
    return {
        "mIoU": np.nanmean(ious),
        "mAcc": np.nanmean(accs),
        "aAcc": (pred == target).mean(),
        "fwIoU": (freq[valid] * ious[valid]).sum(),
        "IoU": ious,
        "Acc": accs,
    }


def _random_batch(generator: torch.Generator, num_classes: int, shape=(3, 17, 23), absent=(), ignore_frac=0.1):
    target = torch.randint(0, num_classes, shape, generator=generator)
    # Make predictions agree with the target most of the time so the metrics are far from trivial values.
    noise = torch.randint(0, num_classes, shape, generator=generator)
    pred = torch.where(torch.rand(shape, generator=generator) < 0.6, target, noise)
    replacement = next(c for c in range(num_classes) if c not in absent)
    for c in absent:
        target[target == c] = replacement
        pred[pred == c] = replacement
    target[torch.rand(shape, generator=generator) < ignore_frac] = IGNORE
    return pred, target


@pytest.mark.parametrize("num_classes,absent", [(2, ()), (5, ()), (7, (3,)), (12, (0, 11))])
def test_matches_independent_numpy(num_classes, absent):
    gen = torch.Generator().manual_seed(1000 * SEED + num_classes)
    cm = ConfusionMatrix(num_classes)
    preds, targets = [], []
    for _ in range(3):  # several updates: the matrix must accumulate, not be overwritten
        pred, target = _random_batch(gen, num_classes, absent=absent)
        cm.update(pred, target)
        preds.append(pred.numpy())
        targets.append(target.numpy())
    got = cm.compute()
    want = _numpy_metrics(np.concatenate(preds), np.concatenate(targets), num_classes)
    for key in ("mIoU", "mAcc", "aAcc", "fwIoU"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    np.testing.assert_allclose(np.array(got["IoU"]), want["IoU"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(np.array(got["Acc"]), want["Acc"], rtol=1e-12, equal_nan=True)
    for c in absent:
        assert math.isnan(got["IoU"][c]) and math.isnan(got["Acc"][c])
    assert got["num_pixels"] == int(sum((t != IGNORE).sum() for t in targets))


@pytest.mark.parametrize("num_classes,absent", [(4, ()), (9, (2, 5))])
def test_matches_torchmetrics_jaccard(num_classes, absent):
    from torchmetrics.classification import MulticlassJaccardIndex

    gen = torch.Generator().manual_seed(1000 * SEED + 100 + num_classes)
    ours = ConfusionMatrix(num_classes, ignore_index=IGNORE)
    peer = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=IGNORE, average="macro")
    peer_per_class = MulticlassJaccardIndex(num_classes=num_classes, ignore_index=IGNORE, average="none")
    for _ in range(4):
        pred, target = _random_batch(gen, num_classes, shape=(2, 13, 11), absent=absent)
        ours.update(pred, target)
        peer.update(pred, target)
        peer_per_class.update(pred, target)
    got = ours.compute()
    assert got["mIoU"] == pytest.approx(float(peer.compute()), abs=1e-6)
    per_class = peer_per_class.compute().double().numpy()
    present = ~np.isnan(np.array(got["IoU"]))
    np.testing.assert_allclose(np.array(got["IoU"])[present], per_class[present], atol=1e-6)


def test_absent_and_false_positive_classes():
    cm = ConfusionMatrix(4)
    target = torch.tensor([[0, 0, 1, 1, IGNORE]])
    pred = torch.tensor([[0, 2, 1, 1, 3]])  # class 2 predicted but absent; class 3 only under the ignore pixel
    cm.update(pred, target)
    m = cm.compute()
    assert m["IoU"][0] == pytest.approx(0.5)  # tp 1, gt 2, pred 1
    assert m["IoU"][1] == 1.0
    assert m["IoU"][2] == 0.0  # a false positive class counts as 0 ...
    assert math.isnan(m["Acc"][2])  # ... but has no accuracy
    assert math.isnan(m["IoU"][3]) and math.isnan(m["Acc"][3])  # the ignored pixel does not create class 3
    assert m["mIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["mAcc"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["aAcc"] == pytest.approx(3 / 4)
    assert m["num_pixels"] == 4


def test_logits_are_reduced_by_argmax_and_reset_works():
    gen = torch.Generator().manual_seed(1000 * SEED + 1)
    logits = torch.randn(2, 3, 5, 6, generator=gen)
    target = torch.randint(0, 3, (2, 5, 6), generator=gen)
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.matrix, b.matrix)
    a.reset()
    assert int(a.matrix.sum()) == 0
    empty = a.compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"]) and empty["num_pixels"] == 0


def test_merge_equals_single_update():
    gen = torch.Generator().manual_seed(1000 * SEED + 2)
    pred, target = _random_batch(gen, 5, shape=(4, 8, 8))
    whole, part1, part2 = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(pred, target)
    part1.update(pred[:2], target[:2])
    part2.update(pred[2:], target[2:])
    assert torch.equal(part1.merge(part2).matrix, whole.matrix)
    # all_reduce without a process group is a no-op
    assert torch.equal(whole.all_reduce().matrix, part1.matrix)


def test_table_lists_every_class():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]]))
    text = cm.table(["sky", "grass", "water"])
    lines = text.splitlines()
    assert any(line.startswith("sky") and "50.00" in line for line in lines)
    assert any(line.startswith("grass") and "50.00" in line and "100.00" in line for line in lines)
    assert any(line.startswith("water") and line.split()[1:] == ["-", "-"] for line in lines)
    assert "mIoU 50.00" in text
    with pytest.raises(ValueError, match="2 class names for num_classes=3"):
        cm.table(["a", "b"])


@pytest.mark.parametrize(
    "pred,target,match",
    [
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long), r"\(2, 4, 4\).*\(2, 4, 5\)"),
        (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 7, 255]]), "target label 7 is outside 0..3"),
        (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, -1, 1]]), "target label -1 is outside 0..3"),
        (torch.tensor([[0, 4, 1]]), torch.tensor([[0, 1, 1]]), "predicted class 4 is outside 0..3"),
        (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), "integer class ids"),
        (torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long), "pred must hold integer class ids"),
        (
            torch.zeros(1, 5, 2, 2),
            torch.zeros(1, 2, 2, dtype=torch.long),
            "5 channels but the metric has num_classes=4",
        ),
    ],
)
def test_bad_input_raises_clear_error(pred, target, match):
    cm = ConfusionMatrix(4)
    with pytest.raises(ValueError, match=match):
        cm.update(pred, target)
    assert int(cm.matrix.sum()) == 0  # a rejected batch leaves the counts untouched


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="positive int"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="ignore_index=2 is a valid class id"):
        ConfusionMatrix(4, ignore_index=2)


def test_ignore_index_none_counts_everything():
    cm = ConfusionMatrix(3, ignore_index=None)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    assert cm.compute()["num_pixels"] == 3
    with pytest.raises(ValueError, match="target label 255"):
        cm.update(torch.tensor([0]), torch.tensor([255]))
