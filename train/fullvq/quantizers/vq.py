"""Plain VQ (VQ-VAE / taming): a learned embedding, codebook loss + beta * commitment."""

import torch
from torch import nn

from .base import Quantizer


class VQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, **kw):
        super().__init__(codebook_size, dim, **kw)
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        return self.embedding.weight
