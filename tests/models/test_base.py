"""The one pad / crop / resize of fastseg's models (fastseg.models._base)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastseg.models._base import crop_to, pad_to_multiple, resize


def test_pad_to_multiple_replicates_images_and_fills_labels():
    images = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    padded = pad_to_multiple(images, 4)
    assert padded.shape == (2, 3, 8, 8)
    assert torch.equal(padded[..., :5, :7], images)
    assert torch.equal(padded[..., 5:, :7], images[..., 4:5, :].expand(-1, -1, 3, -1))  # bottom rows: the last row
    assert torch.equal(padded[..., :5, 7:], images[..., :, 6:7])  # right column: the last column
    labels = torch.randint(0, 3, (2, 5, 7))
    filled = pad_to_multiple(labels, 4, value=255)
    assert filled.shape == (2, 8, 8) and filled.dtype == labels.dtype
    assert (
        torch.equal(filled[:, :5, :7], labels)
        and bool((filled[:, 5:] == 255).all())
        and bool((filled[:, :, 7:] == 255).all())
    )
    same = torch.randn(1, 3, 8, 16)
    assert pad_to_multiple(same, 8) is same


@pytest.mark.parametrize("size", [(33, 47), (64, 64)])
def test_crop_undoes_the_padding_at_the_output_stride(size):
    stride, multiple = 4, 32
    h, w = size
    images = torch.randn(1, 3, h, w)
    padded = pad_to_multiple(images, multiple)
    logits = F.avg_pool2d(padded, stride)  # a stand-in model at stride 4
    out = crop_to(logits, (math.ceil(h / stride), math.ceil(w / stride)))
    assert out.shape[-2:] == (math.ceil(h / stride), math.ceil(w / stride))
    torch.testing.assert_close(out, logits[..., : out.shape[-2], : out.shape[-1]])
    if h % multiple == 0 and w % multiple == 0:
        assert out is logits


def test_resize_is_bilinear_without_corner_alignment():
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(
        resize(x, (10, 12)), F.interpolate(x, size=(10, 12), mode="bilinear", align_corners=False)
    )
