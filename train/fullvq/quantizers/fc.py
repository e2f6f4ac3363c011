"""Factorised, l2-normalised codes (ViT-VQGAN / LlamaGen): low dimension, cosine matching."""

import torch
import torch.nn.functional as F

from .vq import VQ


class FactorizedVQ(VQ):
    metric = "cosine"

    def normalize(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=-1)
