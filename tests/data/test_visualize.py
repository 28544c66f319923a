"""Mask colouring, overlays and PNG grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastseg.data import PALETTE, ShapesConfig, ShapesDataset, colorize, overlay, render_grid, save_png
from fastseg.data.visualize import IGNORE_COLOR, to_uint8_image


def test_colorize_single_and_batch():
    mask = torch.tensor([[0, 1], [255, 11]])
    out = colorize(mask, PALETTE, ignore_index=255)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == PALETTE[0].tolist()
    assert out[1, 1].tolist() == PALETTE[11].tolist()
    assert out[1, 0].tolist() == list(IGNORE_COLOR)
    batch = colorize(np.stack([mask.numpy(), mask.numpy()[::-1]]), PALETTE)
    assert batch.shape == (2, 2, 2, 3)
    assert np.array_equal(batch[0], out)


def test_colorize_rejects_unknown_labels():
    with pytest.raises(ValueError, match="label 12"):
        colorize(np.array([[0, 12]]), PALETTE)
    with pytest.raises(ValueError, match="label -3"):
        colorize(np.array([[-3, 1]]), PALETTE)
    with pytest.raises(ValueError, match="integer"):
        colorize(np.zeros((2, 2), np.float32), PALETTE)
    with pytest.raises(ValueError, match="palette"):
        colorize(np.zeros((2, 2), np.int64), np.zeros((4, 4), np.uint8))


def test_overlay_blends_and_skips_ignore():
    image = np.full((3, 4, 3), 100, np.uint8)
    mask = np.array([[0, 1, 2, 255]] * 3)
    assert np.array_equal(overlay(image, mask, PALETTE, alpha=0.0), image)
    full = overlay(image, mask, PALETTE, alpha=1.0)
    assert full.shape == (3, 4, 3) and full.dtype == np.uint8
    assert full[0, 1].tolist() == PALETTE[1].tolist()
    assert full[0, 3].tolist() == [100, 100, 100]  # ignore pixels keep the image
    half = overlay(image, mask, PALETTE, alpha=0.5)
    assert np.abs(half[0, 0].astype(int) - (100 + PALETTE[0].astype(int)) / 2).max() <= 1
    with pytest.raises(ValueError, match="image is 3x4 but mask is 3x5"):
        overlay(image, np.zeros((3, 5), np.int64), PALETTE)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, mask, PALETTE, alpha=1.5)


def test_to_uint8_image_layouts():
    chw = torch.rand(3, 5, 6)
    hwc = to_uint8_image(chw)
    assert hwc.shape == (5, 6, 3) and hwc.dtype == np.uint8
    assert np.array_equal(to_uint8_image(chw.permute(1, 2, 0).numpy()), hwc)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_image(torch.full((3, 2, 2), float("nan")))


def test_save_png_round_trip_and_errors(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = save_png(arr, tmp_path / "sub" / "a.png")
    assert np.array_equal(np.asarray(Image.open(path)), arr)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ValueError, match="uint8"):
        save_png(arr.astype(np.float32), tmp_path / "b.png")
    with pytest.raises(ValueError, match="empty"):
        save_png(np.zeros((0, 4, 3), np.uint8), tmp_path / "c.png")
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("size,n,columns", [(64, 6, 4), ((40, 56), 3, 5)])
def test_render_grid_writes_expected_png(tmp_path, size, n, columns):
    ds = ShapesDataset("val", length=10, config=ShapesConfig(image_size=size))
    h, w = ds.config.image_size
    path = render_grid(ds, n=n, columns=columns, path=tmp_path / "grid.png", scale=2, legend=False)
    img = np.asarray(Image.open(path))
    cols = min(columns, n)
    rows = -(-n // cols)
    pad, gap = 6, 2
    assert img.shape == (rows * (2 * h + pad) + pad, cols * (2 * (2 * w) + gap + pad) + pad, 3)
    # The first tile is the first image, the tile beside it its colourised mask.
    first = ds[0]
    mask_tile = img[pad : pad + 2 * h : 2, pad + 2 * w + gap : pad + 4 * w + gap : 2]
    assert np.array_equal(mask_tile, colorize(first["mask"], PALETTE))
    with_legend = np.asarray(Image.open(render_grid(ds, n=n, columns=columns, path=tmp_path / "l.png", scale=2)))
    assert with_legend.shape[1] == img.shape[1] and with_legend.shape[0] > img.shape[0]


def test_render_grid_errors(tmp_path):
    ds = ShapesDataset("val", length=2)
    with pytest.raises(ValueError, match="columns"):
        render_grid(ds, n=2, columns=0, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="nothing to render"):
        render_grid(ds, n=2, path=tmp_path / "x.png", start=5)


def test_overlay_panoptic_instance_distinct_colours_and_void():
    from fastseg.data.visualize import overlay_panoptic

    image = np.full((4, 6, 3), 100, np.uint8)
    pan = np.array([[5001, 5001, 5002, 5002, -1, -1]] * 4)  # two instances of class 5, then void
    palette = np.tile(np.array([[200, 40, 40]], np.uint8), (8, 1))
    out = overlay_panoptic(image, pan, palette, alpha=1.0)
    assert (out[:, 4:] == 100).all()  # void keeps the image
    assert not np.array_equal(out[0, 0], out[0, 3])  # same class, different instances: different colours
    assert (out[:, 1] == 0).all()  # boundary between the two instances is drawn black
    with pytest.raises(ValueError, match="palette has 8 colours"):
        overlay_panoptic(image, np.full((4, 6), 9000), palette)
