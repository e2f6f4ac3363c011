"""VQBridge (FVQ, Chang et al. 2025): the whole codebook through a small ViT every step.

The raw codebook (K, D) is laid out as a sqrt(K) x sqrt(K) grid of D channels (code k at row
k // side, column k % side), patchified by a conv with kernel = stride = p, run through pre-LN ViT
blocks (LayerNorm without affine, GELU-tanh MLP of ratio 2, no positional embedding), normalised,
projected by a linear layer that starts at (near) zero, and un-patchified back to (K, D). The
output replaces the codebook, and every raw code receives a dense gradient through the shared
weights.

head_init_std: the paper starts the last linear layer at exactly zero (head_init_std=0). Then all
codes are equal at step 0, every latent ties and picks code 0, and the head rows of the other code
positions inside a patch get no gradient until the zero code wins a tie: on the tiny preset at
K = 16384 that left 42% of the codes unused after 3000 steps (XS/4; 80% with XS/8). fullvq's
default, N(0, 1e-3^2), starts the codes near zero but distinct (93-94% used at 10 tokens per code
with XS/4 and XS/8 alike; docs/training.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer

# name -> (width, depth, heads). The paper names its bridges XS..XL with patch 2/4/8; these sizes
# are fullvq's, chosen so that XS..XL span about 0.1M to 70M parameters.
BRIDGE_SIZES = {"XS": (128, 2, 2), "S": (256, 2, 4), "B": (512, 4, 8), "L": (768, 6, 12), "XL": (1024, 8, 16)}
PATCHES = (2, 4, 8, 16)


def parse_bridge(name: str) -> tuple[int, int, int, int]:
    """"S/4" -> (width, depth, heads, patch)."""
    size, _, patch = name.upper().partition("/")
    if size not in BRIDGE_SIZES or not patch.isdigit() or int(patch) not in PATCHES:
        raise ValueError(f"unknown bridge {name!r}: expected SIZE/PATCH with SIZE in {list(BRIDGE_SIZES)} "
                         f"and PATCH in {list(PATCHES)}, e.g. 'S/4'")
    return (*BRIDGE_SIZES[size], int(patch))


def check_grid(codebook_size: int, patch: int) -> int:
    """Side of the square code grid; a clear error suggesting valid sizes otherwise."""
    side = math.isqrt(codebook_size)
    if side * side == codebook_size and side % patch == 0:
        return side
    lower = side - side % patch
    upper = lower + patch
    suggest = [s * s for s in (lower, upper) if s > 0]
    reason = "is not a perfect square" if side * side != codebook_size else f"has side {side}, not divisible by {patch}"
    raise ValueError(f"bridge codebook size {codebook_size} {reason}: VQBridge lays codes out on a square grid "
                     f"cut into {patch}x{patch} patches; use e.g. {' or '.join(map(str, suggest))}")


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)). x (B, N, W)."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"bridge width {width} is not divisible by its {heads} attention heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(approximate="tanh"), nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class VQBridge(nn.Module):
    """(K, D) raw codes -> (K, D) codes.

    `VQBridge(K, D, *parse_bridge("S/4"))` builds a named config; the MLP is 2x the width unless
    `mlp_width` says otherwise. `pos_embed` ((K / p^2, width), added after the patch embedding) is
    None as in the paper; only bridges converted from other code bases (fullvq.interop) set it.
    """

    def __init__(self, codebook_size: int, dim: int, width: int, depth: int, heads: int, patch: int,
                 head_init_std: float = 0.0, mlp_width: int | None = None):
        super().__init__()
        self.side, self.patch, self.dim = check_grid(codebook_size, patch), patch, dim
        self.patch_embed = nn.Conv2d(dim, width, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", None)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_width or 2 * width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.head = nn.Linear(width, patch * patch * dim)
        nn.init.zeros_(self.head.bias)
        if head_init_std > 0:  # near-zero but distinct codes: positions within a patch are not tied
            nn.init.normal_(self.head.weight, std=head_init_std)
        else:
            nn.init.zeros_(self.head.weight)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        s, p, d = self.side, self.patch, self.dim
        grid = codes.T.reshape(1, d, s, s)
        x = self.patch_embed(grid).flatten(2).transpose(1, 2)  # (1, (s/p)^2, W)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.head(self.norm(x))  # (1, (s/p)^2, p*p*D)
        n = s // p
        return x.view(n, n, p, p, d).permute(0, 2, 1, 3, 4).reshape(s * s, d)


class BridgeQuantizer(Quantizer):
    def __init__(self, codebook_size: int, dim: int, bridge: str = "S/4", head_init_std: float = 0.0, **kw):
        super().__init__(codebook_size, dim, **kw)
        self.raw = nn.Parameter(torch.randn(codebook_size, dim))
        self.bridge = VQBridge(codebook_size, dim, *parse_bridge(bridge), head_init_std)

    def codebook(self) -> torch.Tensor:
        return self.bridge(self.raw)
