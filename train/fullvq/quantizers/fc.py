"""Factorised, l2-normalised codes (ViT-VQGAN / LlamaGen): plain VQ at low dimension, cosine matching."""

from .vq import VQ


class FactorizedVQ(VQ):
    def __init__(self, codebook_size: int, dim: int, **kw):
        super().__init__(codebook_size, dim, **{**kw, "l2_norm": True})
