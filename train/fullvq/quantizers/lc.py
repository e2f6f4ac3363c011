"""VQGAN-LC (Zhu et al. 2024): a frozen codebook of pretrained-feature k-means centres behind a
trainable linear projector into the latent space. The centres come from
`python train/build_lc_codebook.py`; once built into a model they live in its state dict.

The centres are standardised per feature (zero mean, unit variance) when loaded: a fixed affine
map the projector could learn itself, but pretrained features share a large mean, and without it
every projected code starts nearly equal and training collapses onto one code (measured: 0.006%
usage at step 100 on the tiny preset).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import Quantizer


def load_lc_codebook(path: str, codebook_size: int) -> torch.Tensor:
    """(K, C) float32 centres from a train/build_lc_codebook.py file, checked against K, standardised."""
    from ..lc_codebook import load_codebook

    build = f"python train/build_lc_codebook.py --codebook-size {codebook_size}"
    if not path:
        raise ValueError(f"the lc quantizer needs quantizer.lc_codebook=PATH: build one with `{build}`")
    if not Path(path).is_file():
        raise ValueError(f"lc codebook {path!r} does not exist: build it with `{build} --out {path}`")
    codes = load_codebook(path)["codebook"].float()
    if codes.shape[0] != codebook_size:
        raise ValueError(f"{path!r} holds {codes.shape[0]} codes but codebook_size is {codebook_size}: "
                         f"rebuild it with `{build}` or set --codebook-size {codes.shape[0]}")
    return (codes - codes.mean(0)) / codes.std(0).clamp_min(1e-6)


class LCQuantizer(Quantizer):
    def __init__(self, codebook_size: int, dim: int, feature_dim: int, centres: torch.Tensor | None = None, **kw):
        super().__init__(codebook_size, dim, **kw)
        frozen = torch.zeros(codebook_size, feature_dim) if centres is None else centres
        self.register_buffer("frozen", frozen)
        self.projector = nn.Linear(feature_dim, dim)

    def codebook(self) -> torch.Tensor:
        return self.projector(self.frozen)
