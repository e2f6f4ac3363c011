"""The tokenizer's training objective: pixel + perceptual + adversarial terms (the quantizer adds
its own). Each term is off at weight 0, and a term that is off is never computed.

Called as one module in two modes, so that DDP can wrap it when it holds a discriminator:
    loss, stats = criterion("generator", x, recon, step)
    loss = criterion("discriminator", x, recon, step)      # disc_weight x hinge, 0 x hinge before disc_start
Images are (B, 3, H, W) in [-1, 1]. As in LlamaGen's and FVQ's VQLoss, the discriminator's loss carries
disc_weight too, and it is computed (at weight 0) before disc_start, so that its optimiser steps from
the start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig


class ReconstructionLoss(nn.Module):
    def __init__(self, cfg: LossConfig):
        super().__init__()
        if cfg.pixel not in ("l1", "l2"):
            raise ValueError(f"loss.pixel={cfg.pixel!r}: expected 'l1' or 'l2'")
        self.cfg = cfg
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            from .lpips import LPIPS

            self.perceptual = LPIPS("vgg")
        self.discriminator = None
        if cfg.disc_weight > 0:
            from .discriminator import NLayerDiscriminator

            self.discriminator = NLayerDiscriminator()

    def adversarial(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def forward(self, mode: str, x: torch.Tensor, recon: torch.Tensor, step: int):
        if mode == "generator":
            return self._generator(x, recon, step)
        from .discriminator import hinge_d_loss

        weight = self.cfg.disc_weight if self.adversarial(step) else 0.0
        return weight * hinge_d_loss(self.discriminator(x), self.discriminator(recon.detach()))

    def _generator(self, x: torch.Tensor, recon: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        pixel = F.mse_loss(recon, x) if cfg.pixel == "l2" else F.l1_loss(recon, x)
        loss, stats = cfg.pixel_weight * pixel, {"pixel_loss": pixel.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon.float(), x.float()).mean()
            loss = loss + cfg.perceptual_weight * perceptual
            stats["perceptual_loss"] = perceptual.detach()
        if self.discriminator is not None:
            from .discriminator import hinge_g_loss

            # Computed before disc_start too (at weight 0) so that DDP sees every parameter used.
            gan = hinge_g_loss(self.discriminator(recon))
            loss = loss + (cfg.disc_weight if self.adversarial(step) else 0.0) * gan
            stats["gan_loss"] = gan.detach()
        return loss, stats
