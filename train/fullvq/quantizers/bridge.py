"""VQBridge (FVQ, Chang et al. 2025): the whole codebook through a small ViT every step.

The raw codebook (K, D) is laid out as a sqrt(K) x sqrt(K) grid of D channels (code k at row
k // side, column k % side), patchified by a conv with kernel = stride = p, run through pre-LN ViT
blocks (LayerNorm without affine, eps 1e-6; timm attention with qkv bias; GELU-tanh MLP), normalised,
projected by a linear layer and un-patchified back to (K, D). The output replaces the codebook, and
every raw code receives a dense gradient through the shared weights. This is the forward pass of
FVQ's `tokenizer/tokenizer_image/qbridge_ViT.py` (VQBridge), operation for operation, or with
kind "dit" that of `qbridge.py`, the DiT variant FVQ's training scripts run (see VQBridge).

Names (`parse_bridge`) are FVQ's, as qbridge_ViT.py defines them: SIZE/PATCH[-dDEPTH], optionally
spelled "QBridge-L/8". XS, S, B, L, XL are 4 attention heads of 8, 16, 32, 64, 128 channels (width
32 to 512), depth 2 unless -d1 or -d4, MLP 2x the width, patch 2, 4 or 8. FVQ's dictionary lists 19
of these 45 combinations; the others follow the same arithmetic. Any other shape is spelled out as
W{width}-H{heads}-D{depth}/{patch} (MLP 2x the width), e.g. "W128-H4-D2/16", which cannot be read
as an FVQ name. "auto" is FVQ's own choice for K (`fvq_bridge_for`).

Initialisation: "fvq" is FVQ's (raw codes uniform in +-1/K as vq_model_qbridge_release.py does;
patch embedding and every linear layer xavier-uniform with zero biases, as its initialize_weights
does). "fullvq" keeps PyTorch's default layer initialisation and starts the raw codes at N(0, 1).
Either way the last layer starts at N(0, head_init_std^2); head_init_std = 0 is FVQ's exact zero.
With a zero head every code is equal at step 0, every latent ties and takes code 0, and the head
rows of the other positions in a patch get no gradient until the zero code wins a tie
(docs/training.md measures what that costs on the tiny preset).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer

FVQ_HEADS = 4
FVQ_HEAD_DIMS = {"XS": 8, "S": 16, "B": 32, "L": 64, "XL": 128}  # qbridge_ViT.py's head_hidden_size
FVQ_PATCHES = (2, 4, 8)
FVQ_DEPTHS = (1, 2, 4)
LN_EPS = 1e-6  # qbridge_ViT.py's LayerNorms
INITS = ("fullvq", "fvq")
KINDS = ("vit", "dit")
_FVQ_NAME = re.compile(r"(?:qbridge-)?(XS|S|B|L|XL)/(\d+)(?:-d(\d+))?", re.IGNORECASE)
_SPELLED = re.compile(r"W(\d+)-H(\d+)-D(\d+)/(\d+)", re.IGNORECASE)
# fullvq 0.1 (checkpoint version 1) gave XS..XL its own (width, heads, depth); fullvq.checkpoint
# rewrites those names as spelled-out shapes when it reads such a checkpoint.
LEGACY_SIZES = {"XS": (128, 2, 2), "S": (256, 4, 2), "B": (512, 8, 4), "L": (768, 12, 6), "XL": (1024, 16, 8)}
LEGACY_LN_EPS = 1e-5


class BridgeShape(NamedTuple):
    width: int
    depth: int
    heads: int
    patch: int


def parse_bridge(name: str) -> BridgeShape:
    """"L/8" -> BridgeShape(width=256, depth=2, heads=4, patch=8); "W128-H4-D2/16" as spelled."""
    if m := _FVQ_NAME.fullmatch(name.strip()):
        size, patch, depth = m[1].upper(), int(m[2]), int(m[3] or 2)
        if patch in FVQ_PATCHES and depth in FVQ_DEPTHS:
            return BridgeShape(FVQ_HEADS * FVQ_HEAD_DIMS[size], depth, FVQ_HEADS, patch)
    if m := _SPELLED.fullmatch(name.strip()):
        width, heads, depth, patch = map(int, m.groups())
        if min(width, heads, depth, patch) > 0 and width % heads == 0:
            return BridgeShape(width, depth, heads, patch)
    raise ValueError(f"unknown bridge {name!r}: expected one of FVQ's names, SIZE/PATCH[-dDEPTH] with SIZE in "
                     f"{list(FVQ_HEAD_DIMS)}, PATCH in {list(FVQ_PATCHES)} and DEPTH in {list(FVQ_DEPTHS)} (e.g. "
                     f"'L/8', 'B/4-d4'), or a spelled-out shape W<width>-H<heads>-D<depth>/<patch> with heads "
                     f"dividing width (e.g. 'W128-H4-D2/16')")


def fvq_bridge_for(codebook_size: int) -> str:
    """FVQ's choice in scripts/recon: L/4 for 16,384 codes, L/8 for 65,536 and 262,144 (and
    here: L/4 up to 16,384 codes, L/8 beyond)."""
    return "L/4" if codebook_size <= 16384 else "L/8"


def resolve_bridge(name: str, codebook_size: int) -> str:
    """The bridge name a config means: "auto" is FVQ's choice for the codebook size."""
    return fvq_bridge_for(codebook_size) if name == "auto" else name


def legacy_bridge_name(name: str) -> str:
    """fullvq 0.1's "XS/8" -> its shape spelled out, "W128-H2-D2/8"; other names unchanged."""
    size, _, patch = name.upper().partition("/")
    if size not in LEGACY_SIZES or not patch.isdigit():
        return name
    width, heads, depth = LEGACY_SIZES[size]
    return f"W{width}-H{heads}-D{depth}/{patch}"


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


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """(grid^2, width) fixed 2-D sin-cos positions, laid out as FVQ's qbridge.py (MAE's
    get_2d_sincos_pos_embed): the first half of the channels encodes the column, the second the
    row, each as [sin, cos] of position x 10000^(-j / (width / 4)), j < width / 4."""
    if width % 4:
        raise ValueError(f"sin-cos positions need a bridge width divisible by 4, got {width}")
    j = torch.arange(width // 4, dtype=torch.float64)
    omega = 1.0 / 10000 ** (j / (width / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    halves = [torch.cat([(pos.reshape(-1, 1) * omega).sin(), (pos.reshape(-1, 1) * omega).cos()], 1)
              for pos in (cols, rows)]
    return torch.cat(halves, 1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's adaLN: x (B, N, W) * (1 + scale) + shift, with shift and scale (1, W)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)). x (B, N, W).

    With `adaln` (FVQ's DiT bridge), a zero-initialised linear map of the condition gives a shift,
    scale and gate for each half: x + gate * attn(modulate(ln(x), shift, scale)), likewise the MLP.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, ln_eps: float = LN_EPS, adaln: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"bridge width {width} is not divisible by its {heads} attention heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=ln_eps, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=ln_eps, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(approximate="tanh"), nn.Linear(mlp_width, width))
        self.modulation = nn.Linear(width, 6 * width) if adaln else None

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if self.modulation is None:
            x = x + self.attend(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(condition).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attend(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class VQBridge(nn.Module):
    """(K, D) raw codes -> (K, D) codes.

    `VQBridge(K, D, *parse_bridge("L/8"))` builds a named config; the MLP is 2x the width unless
    `mlp_width` says otherwise. kind "vit" is FVQ's ViT bridge (qbridge_ViT.py, the paper's: no
    positions, plain blocks). kind "dit" is the DiT bridge FVQ's training scripts train (qbridge.py
    with one condition): fixed sin-cos positions added after the patch embedding, and adaLN-Zero
    modulation of every block and of the last LayerNorm by SiLU(condition), a learned (1, width)
    vector (FVQ's one-class label embedding). The layers start as PyTorch initialises them (see
    `init_like_fvq`), the modulations at zero, the head at N(0, head_init_std^2).
    """

    def __init__(self, codebook_size: int, dim: int, width: int, depth: int, heads: int, patch: int,
                 head_init_std: float = 0.0, mlp_width: int | None = None, ln_eps: float = LN_EPS,
                 kind: str = "vit"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown bridge kind {kind!r}: expected one of {list(KINDS)}")
        self.side, self.patch, self.dim, self.kind = check_grid(codebook_size, patch), patch, dim, kind
        dit = kind == "dit"
        self.patch_embed = nn.Conv2d(dim, width, kernel_size=patch, stride=patch)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_width or 2 * width, ln_eps, dit) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=ln_eps, elementwise_affine=False)
        self.head = nn.Linear(width, patch * patch * dim)
        self.head_init_std = head_init_std
        if dit:
            self.register_buffer("pos_embed", sincos_pos_embed(width, self.side // patch)[None])
            self.condition = nn.Parameter(torch.empty(1, width).normal_(std=0.02))  # FVQ: N(0, 0.02) label table
            self.final_modulation = nn.Linear(width, 2 * width)
        self._init_zeros()

    def _init_zeros(self) -> None:
        """The head at N(0, head_init_std^2) (0: exactly zero), every modulation at zero (adaLN-Zero)."""
        nn.init.zeros_(self.head.bias)
        if self.head_init_std > 0:  # near-zero but distinct codes: positions within a patch are not tied
            nn.init.normal_(self.head.weight, std=self.head_init_std)
        else:
            nn.init.zeros_(self.head.weight)
        if self.kind == "dit":
            for layer in (*(b.modulation for b in self.blocks), self.final_modulation):
                nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def init_like_fvq(self) -> None:
        """FVQ's initialize_weights: every linear layer and the patch embedding (as the linear map of
        a flattened patch) xavier-uniform with zero bias; then the head and modulations as
        _init_zeros sets them."""
        for module in (self.patch_embed, *(m for m in self.modules() if isinstance(m, nn.Linear))):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            nn.init.zeros_(module.bias)
        self._init_zeros()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        s, p, d = self.side, self.patch, self.dim
        grid = codes.T.reshape(1, d, s, s)
        x = self.patch_embed(grid).flatten(2).transpose(1, 2)  # (1, (s/p)^2, W)
        if self.kind == "dit":
            x = x + self.pos_embed
            condition = F.silu(self.condition)
            for block in self.blocks:
                x = block(x, condition)
            x = modulate(self.norm(x), *self.final_modulation(condition).chunk(2, dim=1))
        else:
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
        x = self.head(x)  # (1, (s/p)^2, p*p*D)
        n = s // p
        return x.view(n, n, p, p, d).permute(0, 2, 1, 3, 4).reshape(s * s, d)


class BridgeQuantizer(Quantizer):
    """Raw codes (K, D) -> VQBridge -> the codebook. `init` is "fullvq" or "fvq" (module docstring),
    `kind` "vit" or "dit" (VQBridge)."""

    def __init__(self, codebook_size: int, dim: int, bridge: str = "auto", head_init_std: float = 0.0,
                 init: str = "fullvq", ln_eps: float = LN_EPS, kind: str = "vit", **kw):
        super().__init__(codebook_size, dim, **kw)
        if init not in INITS:
            raise ValueError(f"unknown bridge initialisation {init!r}: expected one of {list(INITS)}")
        raw = torch.empty(codebook_size, dim)
        self.raw = nn.Parameter(raw.uniform_(-1 / codebook_size, 1 / codebook_size) if init == "fvq" else raw.normal_())
        self.bridge = VQBridge(codebook_size, dim, *parse_bridge(resolve_bridge(bridge, codebook_size)),
                               head_init_std, ln_eps=ln_eps, kind=kind)
        if init == "fvq":
            self.bridge.init_like_fvq()

    def codebook(self) -> torch.Tensor:
        return self.bridge(self.raw)

    def dead_positions(self, counts: torch.Tensor) -> int:
        """How many of the bridge's p x p patch positions had no code used, given a code histogram
        (K,). A position's codes share one slice of the head: when none of them is ever nearest, that
        slice gets no gradient and all K / p^2 of its codes stay dead together."""
        n, p = self.bridge.side // self.bridge.patch, self.bridge.patch
        return int((counts.view(n, p, n, p).sum((0, 2)) == 0).sum())
