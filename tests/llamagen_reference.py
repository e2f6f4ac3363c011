"""LlamaGen's VQModel as the tests' reference: its state-dict layout and a functional forward pass.

Written from the structure and semantics of LlamaGen's ``tokenizer/tokenizer_image/vq_model.py``
(not from fullvq's modules), straight from a state dict:
- GroupNorm(32, eps 1e-6) everywhere, swish = x * sigmoid(x);
- ResnetBlock: norm1, swish, conv1 (3x3), norm2, swish, conv2; ``nin_shortcut`` (1x1) when the
  channel count changes;
- AttnBlock: one head over h*w positions via bmm, scaled by c ** -0.5, then proj_out; residual;
- Downsample: pad (0, 1, 0, 1) with zeros, 3x3 stride-2 conv; Upsample: nearest 2x, 3x3 conv;
- encoder: conv_in, levels (num_res_blocks res blocks, attention after each on the last level,
  a downsample on every level but the last), mid (res, attn, res), norm_out, swish, conv_out;
- decoder: conv_in, mid, levels from the lowest resolution (num_res_blocks + 1 res blocks,
  attention on the first, an upsample on every level but the last), norm_out, swish, conv_out;
- quantizer: d = |z|^2 + |e|^2 - 2 z.e (after l2-normalising both when codebook_l2_norm), argmin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layout(ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2, z_channels: int = 256,
           codebook_size: int = 16384, codebook_dim: int = 8) -> dict[str, tuple[int, ...]]:
    """Every key of a LlamaGen VQModel state dict with its shape (VQ-16 by default)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, c_in, c_out, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def res(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(name, c):
        res(f"{name}.0", c, c)
        attn(f"{name}.1", c)
        res(f"{name}.2", c, c)

    levels = len(ch_mult)
    conv("encoder.conv_in", 3, ch, 3)
    c = ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * mult)
            c = ch * mult
            if i == levels - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
        if i != levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
    mid("encoder.mid", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, z_channels, 3)

    c = ch * ch_mult[-1]
    conv("decoder.conv_in", z_channels, c, 3)
    mid("decoder.mid", c)
    for j, level in enumerate(reversed(range(levels))):
        for r in range(num_res_blocks + 1):
            res(f"decoder.conv_blocks.{j}.res.{r}", c, ch * ch_mult[level])
            c = ch * ch_mult[level]
            if level == levels - 1:
                attn(f"decoder.conv_blocks.{j}.attn.{r}", c)
        if level != 0:
            conv(f"decoder.conv_blocks.{j}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, 3, 3)

    shapes["quantize.embedding.weight"] = (codebook_size, codebook_dim)
    conv("quant_conv", z_channels, codebook_dim, 1)
    conv("post_quant_conv", codebook_dim, z_channels, 1)
    return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0, unit_norm_codebook: bool = False,
                      codebook_used: bool = True) -> dict[str, torch.Tensor]:
    """Random weights for `shapes` (norm scales near 1), plus LlamaGen's `codebook_used` buffer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        value = torch.randn(shape, generator=g) / fan_in ** 0.5
        if "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        sd[key] = value
    if unit_norm_codebook:
        sd["quantize.embedding.weight"] = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    if codebook_used:
        sd["quantize.codebook_used"] = torch.zeros(65536)
    return sd


def _gn(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _conv(sd, name, x, stride=1, padding=None):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(sd, name, x):
    h = _conv(sd, f"{name}.conv1", _swish(_gn(sd, f"{name}.norm1", x)))
    h = _conv(sd, f"{name}.conv2", _swish(_gn(sd, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{name}.nin_shortcut", x)
    return x + h


def _attn(sd, name, x):
    b, c, h, w = x.shape
    y = _gn(sd, f"{name}.norm", x)
    q = _conv(sd, f"{name}.q", y).reshape(b, c, h * w).permute(0, 2, 1)
    k = _conv(sd, f"{name}.k", y).reshape(b, c, h * w)
    v = _conv(sd, f"{name}.v", y).reshape(b, c, h * w)
    weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _conv(sd, f"{name}.proj_out", out)


def _count(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _levels(sd, prefix, x):
    for i in range(_count(sd, f"{prefix}.conv_blocks.")):
        block = f"{prefix}.conv_blocks.{i}"
        for j in range(_count(sd, f"{block}.res.")):
            x = _res(sd, f"{block}.res.{j}", x)
            if f"{block}.attn.{j}.q.weight" in sd:
                x = _attn(sd, f"{block}.attn.{j}", x)
        if f"{block}.downsample.conv.weight" in sd:
            x = _conv(sd, f"{block}.downsample.conv", F.pad(x, (0, 1, 0, 1)), stride=2, padding=0)
        if f"{block}.upsample.conv.weight" in sd:
            x = _conv(sd, f"{block}.upsample.conv", F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return x


def _mid(sd, prefix, x):
    return _res(sd, f"{prefix}.mid.2", _attn(sd, f"{prefix}.mid.1", _res(sd, f"{prefix}.mid.0", x)))


@torch.no_grad()
def latents(sd: dict, image: torch.Tensor) -> torch.Tensor:
    """image (b, 3, H, W) -> latents before quantisation (b, D, h, w)."""
    x = _levels(sd, "encoder", _conv(sd, "encoder.conv_in", image))
    x = _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", _mid(sd, "encoder", x))))
    return _conv(sd, "quant_conv", x)


@torch.no_grad()
def encode(sd: dict, image: torch.Tensor, l2_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """image (b, 3, H, W) -> (quantised latents (b, D, h, w), indices (b, h, w))."""
    z = latents(sd, image).permute(0, 2, 3, 1)
    e = sd["quantize.embedding.weight"]
    if l2_norm:
        z, e = F.normalize(z, dim=-1), F.normalize(e, dim=-1)
    flat = z.reshape(-1, z.shape[-1])
    d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.T
    indices = d.argmin(1)
    return e[indices].view(z.shape).permute(0, 3, 1, 2), indices.view(z.shape[:3])


@torch.no_grad()
def decode(sd: dict, quant: torch.Tensor) -> torch.Tensor:
    """quantised latents (b, D, h, w) -> image (b, 3, H, W)."""
    x = _mid(sd, "decoder", _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", quant)))
    x = _levels(sd, "decoder", x)
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", x)))
