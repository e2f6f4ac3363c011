"""PatchGAN discriminator (pix2pix / taming-transformers / LlamaGen) and its hinge losses.

    disc = NLayerDiscriminator()            # input_nc=3, ndf=64, n_layers=3, BatchNorm
    logits = disc(img)                      # (b, 3, h, w) -> (b, 1, h/8 - 2, w/8 - 2); 256 px -> 30 x 30
    d_loss = hinge_d_loss(disc(real), disc(fake.detach()))
    g_loss = hinge_g_loss(disc(fake))

Under DDP with norm="batch", the statistics are per rank, and calling the wrapped discriminator twice
in one step (real, then fake) can trip autograd's in-place check on the broadcast BatchNorm buffers:
pass broadcast_buffers=False to DDP, convert with nn.SyncBatchNorm, or use norm="group".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NLayerDiscriminator", "hinge_d_loss", "hinge_g_loss"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class NLayerDiscriminator(nn.Module):
    """taming's NLayerDiscriminator: (b, input_nc, h, w) -> patch logits (b, 1, h', w').

    conv4/s2 + LeakyReLU(0.2), then n_layers - 1 blocks of conv4/s2 + norm + LeakyReLU with
    channels ndf * min(2^n, 8), one conv4/s1 block, and a conv4/s1 to 1 channel (all padding 1;
    convs followed by a norm have no bias). Init: conv weights ~ N(0, 0.02), norm weights ~ N(1, 0.02),
    norm biases 0. norm: "batch" (taming) or "group" (GroupNorm(32, c), no batch statistics).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, input_nc, h, w) -> logits (b, 1, h', w'); h' = h/8 - 2 for n_layers=3."""
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss: -mean(fake logits), a scalar."""
    return -torch.mean(logits_fake)
