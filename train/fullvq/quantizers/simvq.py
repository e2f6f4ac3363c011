"""SimVQ (Zhu et al. 2024): a frozen random codebook behind a trainable linear projector."""

import torch
from torch import nn

from .base import Quantizer


class SimVQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, **kw):
        super().__init__(codebook_size, dim, **kw)
        self.register_buffer("frozen", torch.randn(codebook_size, dim) * dim**-0.5)
        self.projector = nn.Linear(dim, dim, bias=False)

    def codebook(self) -> torch.Tensor:
        return self.projector(self.frozen)
