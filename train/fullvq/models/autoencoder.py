"""The LlamaGen / taming-transformers VQ autoencoder (CNN encoder, decoder, 1x1 quant convs).

Submodule names, order and semantics follow LlamaGen's ``tokenizer/tokenizer_image/vq_model.py`` so
that its published state dicts load with identical keys. Shapes use b (batch), c (channels),
h, w (spatial), d (codebook dim), k (codebook size); f = 2 ** (len(ch_mult) - 1) is the
downsample factor.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# LlamaGen's nonlinearity x * sigmoid(x), as torch's fused kernel: one pass each way instead of three
# (a third off a tiny-preset training step on a CPU: bench/activation.py)
swish = F.silu


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm(groups, channels, eps=1e-6, affine); ValueError unless groups divides channels."""
    if groups < 1 or channels % groups:
        raise ValueError(
            f"GroupNorm needs the channel count to be divisible by norm_groups, got {channels} "
            f"channels and norm_groups={groups}; choose ch (times every ch_mult) as a multiple of "
            f"norm_groups, or a norm_groups that divides it"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3 twice, plus a shortcut (1x1 ``nin_shortcut`` when channels change).

    (b, c_in, h, w) -> (b, c_out, h, w)
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions with 1x1 q, k, v, proj_out; residual.

    (b, c, h, w) -> (b, c, h, w)
    """

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (b, c, h, w) -> (b, 1, h*w, c): one head, softmax scale c ** -0.5
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv. (b, c, h, w) -> (b, c, h/2, w/2)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv. (b, c, h, w) -> (b, c, 2h, 2w)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(res: list[nn.Module], attn: list[nn.Module], resample: tuple[str, nn.Module] | None) -> nn.Module:
    """One resolution level: ``.res`` and ``.attn`` ModuleLists, optional ``.downsample``/``.upsample``."""
    block = nn.Module()
    block.res = nn.ModuleList(res)
    block.attn = nn.ModuleList(attn)
    if resample is not None:
        setattr(block, *resample)
    return block


def _run_level(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Res blocks, each followed by its attention block where the level has them."""
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[i](h)
    return h


def _mid(channels: int, dropout: float, norm_groups: int) -> nn.ModuleList:
    return nn.ModuleList([
        ResnetBlock(channels, channels, dropout, norm_groups),
        AttnBlock(channels, norm_groups),
        ResnetBlock(channels, channels, dropout, norm_groups),
    ])


class Encoder(nn.Module):
    """Image to latent. (b, in_channels, H, W) -> (b, z_channels, H/f, W/f)

    Level i has ``num_res_blocks`` res blocks at ``ch * ch_mult[i]`` channels; the last (lowest
    resolution) level also has one attention block after each res block; every level but the last
    ends with a downsample. Then mid (res, attn, res), norm_out, swish, conv_out.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        levels = len(ch_mult)
        self.z_channels = z_channels
        self.downsample_factor = 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, dropout, norm_groups)
                   for j in range(num_res_blocks)]
            last = i == levels - 1
            attn = [AttnBlock(c_out, norm_groups) for _ in range(num_res_blocks)] if last else []
            self.conv_blocks.append(_level(res, attn, None if last else ("downsample", Downsample(c_out))))
            c_in = c_out
        self.mid = _mid(c_in, dropout, norm_groups)
        self.norm_out = group_norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent to image. (b, z_channels, h, w) -> (b, out_channels, h*f, w*f)

    conv_in, mid (res, attn, res), then the levels from lowest to highest resolution:
    ``conv_blocks[j]`` is level ``len(ch_mult) - 1 - j`` with ``num_res_blocks + 1`` res blocks at
    ``ch * ch_mult[level]`` channels; ``conv_blocks[0]`` (lowest resolution) also has one attention
    block after each res block; every level but the last ends with an upsample. Then norm_out,
    swish, conv_out.
    """

    def __init__(
        self,
        z_channels: int = 256,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        out_channels: int = 3,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        levels = len(ch_mult)
        self.z_channels = z_channels
        self.upsample_factor = 2 ** (levels - 1)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, dropout, norm_groups)
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            c_out = ch * ch_mult[level]
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, dropout, norm_groups)
                   for j in range(num_res_blocks + 1)]
            lowest = level == levels - 1
            attn = [AttnBlock(c_out, norm_groups) for _ in range(num_res_blocks + 1)] if lowest else []
            self.conv_blocks.append(_level(res, attn, None if level == 0 else ("upsample", Upsample(c_out))))
            c_in = c_out
        self.norm_out = group_norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """conv_out's weight, for the adaptive GAN loss weight."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQModel(nn.Module):
    """Encoder -> quant_conv (1x1, z_channels -> d) -> quantize -> post_quant_conv (1x1) -> decoder.

    ``quantize`` maps (b, d, h, w) to an output with fields z_q (b, d, h, w), indices (b, h, w)
    int64, loss (scalar) and stats (dict), the quantizers' QuantOut.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, quantize: nn.Module, codebook_dim: int):
        super().__init__()
        if encoder.z_channels != decoder.z_channels:
            raise ValueError(
                f"encoder.z_channels={encoder.z_channels} differs from decoder.z_channels="
                f"{decoder.z_channels}; build both with the same z_channels"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.quantize = quantize
        self.quant_conv = nn.Conv2d(encoder.z_channels, codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_dim, encoder.z_channels, 1)

    def encode(self, x: torch.Tensor) -> Any:
        """(b, 3, H, W) -> QuantOut with z_q (b, d, H/f, W/f), indices (b, H/f, W/f)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """(b, d, h, w) code vectors -> (b, 3, h*f, w*f) image."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """indices (b, h, w) into codebook (k, d) -> (b, 3, h*f, w*f) image."""
        return self.decode(F.embedding(indices, codebook).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(b, 3, H, W) -> (reconstruction (b, 3, H, W), QuantOut)."""
        out = self.encode(x)
        return self.decode(out.z_q), out
