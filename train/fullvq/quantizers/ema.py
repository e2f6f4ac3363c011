"""VQ with an exponential-moving-average codebook (VQ-VAE-2): no codebook loss, only commitment."""

import torch
import torch.distributed as dist

from .base import Quantizer


class EMAVQ(Quantizer):
    codebook_loss = False

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, eps: float = 1e-5, **kw):
        if kw.get("l2_norm"):
            raise ValueError("quantizer.l2_norm is not supported by the ema quantizer (its averages are not unit vectors)")
        super().__init__(codebook_size, dim, **kw)
        self.decay, self.eps = decay, eps
        weight = torch.randn(codebook_size, dim)
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", weight.clone())

    def codebook(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def after_assignment(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        if not self.training:
            return
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        if dist.is_initialized():  # every rank applies the same update
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace
        self.weight.copy_(self.embed_sum / smoothed.unsqueeze(1))
