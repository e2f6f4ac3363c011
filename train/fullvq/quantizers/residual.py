"""Residual VQ: `depth` quantizers of one kind, each quantising what the previous ones left.

indices are (B, h, w, depth) and bake() is (depth, K, D); z_q is the sum of the stages' codes.
The straight-through gradient passes once, through the first stage (d z_q / d z = I for plain VQ,
as in RQ-VAE and EnCodec): every stage's input is z minus the earlier stages' detached codes, so
letting each stage's straight-through add its own copy would scale the encoder's gradient by depth.
Each stage's loss still reaches the encoder (its commitment term is |z - sum of codes so far|^2).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import QuantOut


class ResidualQuantizer(nn.Module):
    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.depth = len(stages)
        self.metric = stages[0].metric
        self.codebook_size, self.dim = stages[0].codebook_size, stages[0].dim

    def forward(self, z: torch.Tensor) -> QuantOut:
        residual, z_q, loss, indices, stats = z, torch.zeros_like(z), 0.0, [], {}
        for i, stage in enumerate(self.stages):
            out = stage(residual)
            z_q = z_q + (out.z_q if i == 0 else out.z_q.detach())
            residual = residual - out.z_q.detach()
            loss = loss + out.loss
            indices.append(out.indices)
            stats.update({f"{k}_{i}": v for k, v in out.stats.items()})
        return QuantOut(z_q, torch.stack(indices, -1), loss, stats)

    def codebook(self) -> torch.Tensor:
        return torch.stack([s.codebook() for s in self.stages])

    @torch.no_grad()
    def bake(self) -> torch.Tensor:
        return torch.stack([s.bake() for s in self.stages])
