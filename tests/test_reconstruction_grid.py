"""OUT/reconstructions.png: labelled rows, numbered columns, tiles enlarged by nearest neighbour."""

import numpy as np
import torch
from PIL import Image

from fullvq.evaluation import save_grid


def as_input(pixels):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1] that rounds back to the same bytes."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def tile(png, xy, size):
    x, y = xy
    return png[y:y + size[0], x:x + size[1]]


def test_default_run_grid_is_labelled_and_enlarged(tmp_path):
    # the default run: 16 preview tiles of 32 px, 8 columns
    rng = np.random.default_rng(0)
    orig = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    recon = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    boxes = save_grid(tmp_path / "grid.png", as_input(orig), as_input(recon))
    png = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))

    assert len(boxes["original"]) == len(boxes["reconstruction"]) == 16
    scale = 4                                              # 32 px tiles -> 128 px

    def up(a):                                             # nearest-neighbour upscale
        return a.repeat(scale, 0).repeat(scale, 1)

    for i in range(16):
        (xo, yo), (xr, yr) = boxes["original"][i], boxes["reconstruction"][i]
        assert xo == xr and yr >= yo + 32 * scale          # each reconstruction right below its original
        assert np.array_equal(tile(png, (xo, yo), (128, 128)), up(orig[i]))
        assert np.array_equal(tile(png, (xr, yr), (128, 128)), up(recon[i]))
    # 8 columns, two pairs of rows; the image is no larger than the tiles, the gaps and the bands
    xs = sorted({x for x, _ in boxes["original"]})
    ys = sorted({y for _, y in boxes["original"] + boxes["reconstruction"]})
    assert len(xs) == 8 and len(ys) == 4
    assert png.shape[1] >= xs[-1] + 128 and png.shape[1] <= xs[-1] + 128 + 8
    assert png.shape[0] >= ys[-1] + 128 and png.shape[0] <= ys[-1] + 128 + 8

    # a label band left of the tiles with text beside every row, and a band of column numbers on top
    left, top = xs[0], ys[0]
    assert left >= 60 and top >= 10
    dark = png.min(axis=2) < 100
    for y in ys:
        assert dark[y:y + 128, :left].any(), f"no label beside the row at y={y}"
    assert dark[:top, left:].any(), "no column numbers"


def test_partial_rows_are_kept_and_large_tiles_not_scaled(tmp_path):
    rng = np.random.default_rng(1)
    orig = rng.integers(0, 256, (5, 160, 200, 3), dtype=np.uint8)
    boxes = save_grid(tmp_path / "grid.png", as_input(orig), as_input(orig[::-1].copy()), columns=4)
    png = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert len(boxes["original"]) == len(boxes["reconstruction"]) == 5   # the fifth is not dropped
    for i in range(5):
        assert np.array_equal(tile(png, boxes["original"][i], (160, 200)), orig[i])
        assert np.array_equal(tile(png, boxes["reconstruction"][i], (160, 200)), orig[4 - i])
