"""Tests of `fastseg.layers.masking.classwise_patch_mask` (S4MIM's class-wise patch masking, plain PyTorch) against
independent loop oracles: patch ownership by majority class, and pixel-level masking within a patch's class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg.layers.masking import classwise_patch_mask

IGNORE = 255


def region_labels(batch: int, height: int, width: int, num_classes: int, ignore_frac: float = 0.0) -> torch.Tensor:
    """Class regions of random 3-6 pixel blocks (so patches of every size straddle region borders), some ignore."""
    block = int(torch.randint(3, 7, ()).item())
    coarse = torch.randint(0, num_classes, (batch, 1, -(-height // block), -(-width // block))).float()
    labels = F.interpolate(coarse, scale_factor=block, mode="nearest")[:, 0, :height, :width].long()
    labels[torch.rand(batch, height, width) < ignore_frac] = IGNORE
    return labels


def patch_owners(labels, patch, num_classes):
    """Independent loop oracle: majority class per patch (ties: smallest id), -1 for all-ignore patches."""
    batch, height, width = labels.shape
    rows, cols = -(-height // patch), -(-width // patch)
    owners = torch.full((batch, rows, cols), -1)
    for b in range(batch):
        for r in range(rows):
            for c in range(cols):
                block = labels[b, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].flatten()
                block = block[block != IGNORE]
                if block.numel():
                    owners[b, r, c] = torch.bincount(block, minlength=num_classes).argmax()
    return owners


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("patch", [1, 4, 5])
def test_patch_mask_respects_class_regions_and_ratio(ratio, patch):
    labels = region_labels(3, 23, 30, 6, ignore_frac=0.05)
    labels[2, :10, :10] = IGNORE  # whole all-ignore patches
    # The majority rule masks whole patches (it was the default before issue 18; "pixel" is now).
    masked = classwise_patch_mask(
        labels, patch, ratio, generator=torch.Generator().manual_seed(1), num_classes=6, ownership="majority"
    )
    assert masked.shape == labels.shape and masked.dtype == torch.bool
    owners = patch_owners(labels, patch, 6)
    rows, cols = owners.shape[1:]
    padded = F.pad(masked, (0, cols * patch - 30, 0, rows * patch - 23))
    blocks = padded.view(3, rows, patch, cols, patch).permute(0, 1, 3, 2, 4).reshape(3, rows, cols, -1)
    # a patch is masked as a whole (inside the image) or not at all
    inside = F.pad(torch.ones(23, 30, dtype=torch.bool), (0, cols * patch - 30, 0, rows * patch - 23))
    inside = inside.view(rows, patch, cols, patch).permute(0, 2, 1, 3).reshape(rows, cols, -1)
    patch_masked = blocks.any(-1)
    assert torch.equal(blocks, patch_masked.unsqueeze(-1) & inside)
    assert not patch_masked[owners < 0].any()  # all-ignore patches stay visible
    for b in range(3):
        for k in range(6):
            n = int((owners[b] == k).sum())
            m = int(patch_masked[b][owners[b] == k].sum())
            assert abs(m - ratio * n) < 1.0, (b, k, n, m)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("patch", [1, 4, 5])
def test_pixel_mask_hides_only_the_chosen_class_and_respects_the_ratio(ratio, patch):
    labels = region_labels(3, 23, 30, 6, ignore_frac=0.05)
    labels[2, :10, :10] = IGNORE
    masked = classwise_patch_mask(labels, patch, ratio, generator=torch.Generator().manual_seed(1), num_classes=6)
    assert masked.shape == labels.shape and masked.dtype == torch.bool
    assert not masked[labels == IGNORE].any()  # ignored pixels are never hidden, even inside a chosen patch
    rows, cols = -(-23 // patch), -(-30 // patch)
    for b in range(3):
        for k in range(6):
            candidates = chosen = 0
            for r in range(rows):
                for c in range(cols):
                    sl = (slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
                    of_k = labels[b][sl] == k
                    if not of_k.any():
                        continue
                    candidates += 1
                    hidden = masked[b][sl][of_k]
                    assert hidden.all() or not hidden.any(), (b, k, r, c)  # a class's pixels of a patch go together
                    chosen += int(hidden.all())
            assert abs(chosen - ratio * candidates) < 1.0, (b, k, candidates, chosen)


def test_pixel_mask_keeps_minority_pixels_visible_where_majority_hides_them():
    # One 4 x 4 patch: 12 pixels of class 0 and a 4-pixel column of class 1 (the minority).
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, 3] = 1
    gen = lambda: torch.Generator().manual_seed(0)
    majority = classwise_patch_mask(labels, 4, 1.0, generator=gen(), num_classes=2, ownership="majority")
    assert majority.all()  # the patch belongs to class 0 and hides class 1's column with it
    for k in (0, 1):  # ratio 1 of class k only (the other class's pixels are ignored): only class k is hidden
        only_k = torch.where(labels == k, labels, IGNORE)
        pixel = classwise_patch_mask(only_k, 4, 1.0, generator=gen(), num_classes=2)
        assert torch.equal(pixel, labels == k)
    # the thin class is a candidate of its own, so it is masked at ratio 1 (majority never masks it on its own)
    assert classwise_patch_mask(labels, 4, 1.0, generator=gen(), num_classes=2).all()
    with pytest.raises(ValueError, match="ownership"):
        classwise_patch_mask(labels, 4, 0.5, ownership="patch")


def test_patch_mask_is_reproducible_random_and_handles_edges():
    labels = region_labels(2, 16, 16, 4)
    gen = lambda seed: torch.Generator().manual_seed(seed)
    first = classwise_patch_mask(labels, 2, 0.5, generator=gen(3))
    assert torch.equal(first, classwise_patch_mask(labels, 2, 0.5, generator=gen(3)))
    assert not torch.equal(first, classwise_patch_mask(labels, 2, 0.5, generator=gen(4)))
    assert not classwise_patch_mask(torch.full((1, 4, 4), IGNORE), 2, 1.0).any()
    assert classwise_patch_mask(torch.zeros(0, 4, 4, dtype=torch.long), 2, 0.5).shape == (0, 4, 4)
    assert classwise_patch_mask(torch.zeros(1, 1, 1, dtype=torch.long), 4, 1.0).all()


@pytest.mark.parametrize("bad", [7, -3, 254])
def test_out_of_range_labels_raise_naming_the_value(bad):
    labels = torch.randint(0, 5, (2, 4, 4))
    labels[1, 2, 3] = bad
    labels[0, 0, 0] = IGNORE  # the ignore index itself is fine
    with pytest.raises(ValueError, match=rf"value {bad}\b"):
        classwise_patch_mask(labels, 2, 0.5, num_classes=5)


def test_bad_inputs_raise_value_errors():
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="ratio"):
        classwise_patch_mask(labels, 2, 1.5)
    with pytest.raises(ValueError, match="patch_size"):
        classwise_patch_mask(labels, 0, 0.5)
    with pytest.raises(ValueError, match="labels must be one of"):
        classwise_patch_mask(labels.float(), 2, 0.5)
    with pytest.raises(ValueError, match="negative"):
        classwise_patch_mask(labels - 1, 2, 0.5)
