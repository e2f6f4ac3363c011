"""Codebook and reconstruction metrics shared by the trainer, the evaluator and the study."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def steady_step_time(step_times: list[float]) -> float | None:
    """Mean seconds per step without the first tenth (start-up: allocation, warm caches); None when
    no step was timed (a run resumed after its last step)."""
    if not step_times:
        return None
    skip = min(len(step_times) - 1, max(1, len(step_times) // 10))
    return sum(step_times[skip:]) / (len(step_times) - skip)


class CodeCounter:
    """Exact code histogram of this rank; `across_ranks()` sums it over ranks.

    With depth > 1 (residual VQ) every stage has its own codebook: indices are (..., depth) and the
    histogram (depth * K,) counts (stage, code) pairs, so a code counts as used in each stage that
    picks it, not in every stage once one does.
    """

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu", depth: int = 1):
        self.codebook_size, self.depth = codebook_size, depth
        self.counts = torch.zeros(depth * codebook_size, dtype=torch.long, device=device)

    def add(self, indices: torch.Tensor) -> None:
        """indices: (...) codes, or (..., depth) per stage when depth > 1."""
        indices = indices.to(self.counts.device)
        if self.depth > 1:
            if indices.shape[-1] != self.depth:
                raise ValueError(f"expected indices (..., {self.depth}) of a residual quantizer, got "
                                 f"{tuple(indices.shape)}")
            indices = indices + self.codebook_size * torch.arange(self.depth, device=indices.device)
        self.counts += torch.bincount(indices.reshape(-1), minlength=len(self.counts))

    def across_ranks(self) -> CodeCounter:
        """A new counter holding the histogram summed over ranks (this one is left as it is)."""
        total = CodeCounter(self.codebook_size, self.counts.device, self.depth)
        total.counts += self.counts
        if dist.is_initialized():
            dist.all_reduce(total.counts)
        return total

    @property
    def num_tokens(self) -> int:
        """Token positions counted (each holds `depth` codes)."""
        return int(self.counts.sum()) // self.depth

    @property
    def usage(self) -> float:
        """Fraction of codes used at least once (of every stage's codes: the stages' mean usage)."""
        return float((self.counts > 0).float().mean())

    @property
    def dead_codes(self) -> int:
        """Codes never used, summed over the stages."""
        return int((self.counts == 0).sum())

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code histogram: K for perfectly uniform use (with depth > 1, the
        geometric mean of the stages' perplexities)."""
        p = self.counts.double() / max(1, int(self.counts.sum()))
        return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())) / self.depth


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of images (B, 3, H, W) in [-1, 1], data range 1 after mapping to [0, 1]."""
    return psnr01((x.float().clamp(-1, 1) + 1) / 2, (y.float().clamp(-1, 1) + 1) / 2)


def psnr01(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of images (B, C, H, W) with values in [0, data_range]."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 studio-swing Y (MATLAB rgb2ycbcr) of RGB (B, 3, H, W) in [0, 1] -> (B, 1, H, W) in [16, 235]."""
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device)
    return 16.0 + torch.einsum("bchw,c->bhw", x, weights).unsqueeze(1)


def psnr_y(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) of the Y channel (data range 255) of RGB images (B, 3, H, W) in [0, 1]."""
    return psnr01(luma(x.double()), luma(y.double()), 255.0)


SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (B,) of images (B, C, H, W) (Wang et al. 2004): 11x11 Gaussian window of
    sigma 1.5, K1 = 0.01, K2 = 0.03, population statistics, averaged over the valid window
    positions and the channels. Same as scikit-image's `structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=...)`."""
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    r = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=x.device) - SSIM_WINDOW // 2
    g = torch.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    g = (g / g.sum()).to(x.dtype)
    window = (g[:, None] * g[None, :]).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
