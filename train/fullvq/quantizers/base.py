"""The quantizer contract shared by every quantizer in this package.

    out = quantizer(z)          # z (B, D, h, w) -> QuantOut (same fields for every quantizer)
    quantizer.codebook()        # (K, D) effective codebook (projected where the quantizer projects)
    quantizer.bake()            # (K, D) float32, detached: what inference and export use
    quantizer.metric            # "l2" or "cosine": how the runtime must compare latents with codes
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lookup import nearest_codes


@dataclass
class QuantOut:
    z_q: torch.Tensor                 # (B, D, h, w) straight-through quantised latents
    indices: torch.Tensor             # (B, h, w) int64 code indices
    loss: torch.Tensor                # scalar: codebook + beta * commitment (+ entropy)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


class Quantizer(nn.Module):
    """Nearest-code quantisation with a straight-through estimator.

    Subclasses define `codebook()` and set `codebook_loss = False` when the codebook is not learned
    through the loss. With `l2_norm`, latents and codes are l2-normalised (LlamaGen's
    codebook_l2_norm) and matched by cosine.
    """

    codebook_loss = True

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, entropy_weight: float = 0.0,
                 entropy_temperature: float = 0.01, l2_norm: bool = False):
        super().__init__()
        self.codebook_size, self.dim, self.l2_norm = codebook_size, dim, l2_norm
        self.beta, self.entropy_weight, self.entropy_temperature = beta, entropy_weight, entropy_temperature

    @property
    def metric(self) -> str:
        return "cosine" if self.l2_norm else "l2"

    def codebook(self) -> torch.Tensor:
        raise NotImplementedError

    def normalize(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=-1) if self.l2_norm else v

    @torch.no_grad()
    def bake(self) -> torch.Tensor:
        """(K, D) float32: the codebook as inference sees it, computed once."""
        return self.normalize(self.codebook()).detach().float().clone()

    def forward(self, z: torch.Tensor) -> QuantOut:
        b, d, h, w = z.shape
        if d != self.dim:
            raise ValueError(f"latents have {d} channels, the codebook has dimension {self.dim}")
        flat = self.normalize(z.permute(0, 2, 3, 1).reshape(-1, d).float())
        codes = self.normalize(self.codebook().float())
        indices = nearest_codes(flat, codes, self.metric).to(z.device)
        q = F.embedding(indices, codes)
        commit = F.mse_loss(flat, q.detach())
        stats = {"commit_loss": commit.detach()}
        loss = self.beta * commit
        if self.codebook_loss:
            cb_loss = F.mse_loss(q, flat.detach())
            loss = loss + cb_loss
            stats["codebook_loss"] = cb_loss.detach()
        if self.entropy_weight > 0:
            entropy = entropy_loss(flat, codes, self.entropy_temperature)
            loss = loss + self.entropy_weight * entropy
            stats["entropy_loss"] = entropy.detach()
        self.after_assignment(flat.detach(), indices)
        z_q = flat + (q - flat).detach()
        return QuantOut(z_q.view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype), indices.view(b, h, w), loss, stats)

    def after_assignment(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """Hook for codebooks updated outside the loss (EMA)."""


def entropy_loss(flat: torch.Tensor, codes: torch.Tensor, temperature: float, chunk_rows: int = 1024) -> torch.Tensor:
    """Per-sample entropy minus the entropy of the batch-mean code distribution (MaskGIT/LlamaGen).

    flat (M, D), codes (K, D). Rows are processed in checkpointed chunks, so memory stays
    O(chunk_rows * K) even in the backward pass.
    """

    def chunk_terms(rows: torch.Tensor):
        logits = -torch.cdist(rows, codes).pow(2) / temperature
        probs = logits.softmax(1)
        return -(probs * logits.log_softmax(1)).sum(1).sum(), probs.sum(0)

    sample_entropy, mean_probs = 0.0, 0.0
    for start in range(0, len(flat), chunk_rows):
        s, p = checkpoint(chunk_terms, flat[start:start + chunk_rows], use_reentrant=False)
        sample_entropy, mean_probs = sample_entropy + s, mean_probs + p
    mean_probs = mean_probs / len(flat)
    batch_entropy = -(mean_probs * torch.log(mean_probs + 1e-10)).sum()
    return sample_entropy / len(flat) - batch_entropy
