"""Codebook and reconstruction metrics shared by the trainer, the evaluator and the study."""

from __future__ import annotations

import torch
import torch.distributed as dist


class CodeCounter:
    """Exact code histogram (K,), summed across ranks on `reduce()`."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)

    def add(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.reshape(-1).to(self.counts.device), minlength=len(self.counts))

    def reduce(self) -> CodeCounter:
        if dist.is_initialized():
            dist.all_reduce(self.counts)
        return self

    @property
    def num_tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def usage(self) -> float:
        """Fraction of codes used at least once."""
        return float((self.counts > 0).float().mean())

    @property
    def dead_codes(self) -> int:
        return int((self.counts == 0).sum())

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code histogram: K for perfectly uniform use."""
        p = self.counts.double() / max(1, self.num_tokens)
        return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of images (B, 3, H, W) in [-1, 1], data range 1 after mapping to [0, 1]."""
    x, y = ((x.float().clamp(-1, 1) + 1) / 2), ((y.float().clamp(-1, 1) + 1) / 2)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
