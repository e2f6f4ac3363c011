"""FVQ's two VQBridges and its quantizer as the tests' reference: state-dict layouts and a functional
forward pass, straight from a state dict.

Written from the structure and semantics of FVQ's `tokenizer/tokenizer_image/qbridge_ViT.py` (the
ViT bridge), `qbridge.py` (the DiT bridge its training scripts use) and `vq_model_qbridge*.py`
(the quantizer), not from fullvq's modules:
- configs: XS, S, B, L, XL = 4 heads of 8, 16, 32, 64, 128 channels; depth 2 unless "-d1"/"-d4";
  MLP ratio 2; the name's number is the patch;
- codebook grid: embedding.weight (K, C) -> permute to (C, K) -> (1, C, sqrt K, sqrt K);
- x_embedder: timm PatchEmbed, a conv with kernel = stride = patch and a bias, then flatten(2),
  transpose(1, 2); the DiT bridge adds its stored pos_embed;
- every LayerNorm: no affine, eps 1e-6;
- timm Attention: qkv linear with bias -> (B, N, 3, heads, head_dim) -> q, k, v; softmax(q * d^-1/2 @
  k^T) @ v; heads merged; proj linear;
- timm Mlp: fc1, GELU(tanh), fc2;
- ViT block: x + attn(ln(x)), x + mlp(ln(x)); final layer: linear(ln(x));
- DiT: c = y_embedder row of label 0 (FVQ's inference passes no label, so zeros, without dropout);
  every block's adaLN_modulation = Linear(SiLU(c)) chunked into shift, scale, gate for attention
  and for the MLP: x + gate * attn(ln(x) * (1 + scale) + shift), likewise the MLP; the final layer
  chunks shift, scale: linear(ln(x) * (1 + scale) + shift);
- unpatchify: (N, T, p*p*C) -> (N, h, w, p, p, C) -> einsum nhwpqc -> nchpwq -> (N, C, h*p, w*p),
  then back to (K, C) the way the grid was made;
- quantizer: d = |z|^2 + |e|^2 - 2 z.e over the bridged codebook, argmin; no l2 normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HEAD_CHANNELS = {"XS": 8, "S": 16, "B": 32, "L": 64, "XL": 128}
HEADS = 4
PREFIX = "quantize.qbridge."
RAW_STD = 2e-3


def config(name: str) -> tuple[int, int, int]:
    """"QBridge-L/8" or "QBridge-B/4-d4" -> (width, patch, depth)."""
    size, rest = name.removeprefix("QBridge-").split("/")
    patch, _, depth = rest.partition("-d")
    return HEADS * HEAD_CHANNELS[size], int(patch), int(depth or 2)


def layout(name: str, codebook_size: int, dim: int, dit: bool, num_labels: int = 1) -> dict[str, tuple[int, ...]]:
    """Every key of the bridge's state dict (under quantize.qbridge.) with its shape."""
    width, patch, depth = config(name)
    tokens = codebook_size // patch**2
    shapes = {"x_embedder.proj.weight": (width, dim, patch, patch), "x_embedder.proj.bias": (width,),
              "final_layer.linear.weight": (patch * patch * dim, width),
              "final_layer.linear.bias": (patch * patch * dim,)}
    for i in range(depth):
        for layer, (out, inp) in {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
                                  "mlp.fc1": (2 * width, width), "mlp.fc2": (width, 2 * width)}.items():
            shapes[f"blocks.{i}.{layer}.weight"], shapes[f"blocks.{i}.{layer}.bias"] = (out, inp), (out,)
        if dit:
            shapes[f"blocks.{i}.adaLN_modulation.1.weight"] = (6 * width, width)
            shapes[f"blocks.{i}.adaLN_modulation.1.bias"] = (6 * width,)
    if dit:
        shapes.update({"pos_embed": (1, tokens, width), "y_embedder.embedding_table.weight": (num_labels, width),
                       "final_layer.adaLN_modulation.1.weight": (2 * width, width),
                       "final_layer.adaLN_modulation.1.bias": (2 * width,)})
    return {PREFIX + k: v for k, v in shapes.items()}


def random_bridge(name: str, codebook_size: int, dim: int, dit: bool, seed: int = 0, num_labels: int = 1) -> dict:
    """A state dict of the bridge with every tensor off its initial value: weights ~ N(0, 1/fan_in),
    biases ~ N(0, 0.1^2), the sin-cos pos_embed FVQ starts from plus noise (so that a reader
    recomputing it instead of reading it would be caught). The raw codes and the patch embedding's
    bias are ~ N(0, RAW_STD^2): small, as FVQ's +-1/K start keeps them, so that the first LayerNorm
    sees a variance near its eps and a reader with another eps would be caught too."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout(name, codebook_size, dim, dit, num_labels).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        std = 0.1 if key.endswith("bias") else (1.0 if "embedding_table" in key else fan_in**-0.5)
        sd[key] = (RAW_STD if key.endswith("x_embedder.proj.bias") else std) * torch.randn(shape, generator=g)
    if dit:
        width, patch, _ = config(name)
        grid = math.isqrt(codebook_size) // patch
        sd[PREFIX + "pos_embed"] = sincos_pos_embed(width, grid)[None] + 0.1 * torch.randn(1, grid * grid, width,
                                                                                            generator=g)
    sd["quantize.embedding.weight"] = RAW_STD * torch.randn(codebook_size, dim, generator=g)
    return sd


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos embedding (grid*grid, width) as FVQ's get_2d_sincos_pos_embed lays it out:
    its meshgrid puts w first, so the first half of the channels follows the column, the second the
    row; each half is [sin, cos] of position x 10000^(-j / (width / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    cols, rows = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="xy")
    halves = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angles = pos[:, None] * omega[None]
        halves.append(torch.cat([angles.sin(), angles.cos()], 1))
    return torch.cat(halves, 1).float()


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _attention(sd, name, x, heads):
    b, n, w = x.shape
    qkv = _linear(sd, f"{name}.qkv", x).reshape(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = ((q * (w // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return _linear(sd, f"{name}.proj", (weights @ v).transpose(1, 2).reshape(b, n, w))


def _mlp(sd, name, x):
    return _linear(sd, f"{name}.fc2", F.gelu(_linear(sd, f"{name}.fc1", x), approximate="tanh"))


def codebook(sd: dict, name: str, heads: int = HEADS) -> torch.Tensor:
    """The bridged codebook (K, C) FVQ's model computes from `sd` (float32, as FVQ runs it); `heads`
    other than FVQ's 4 models a bridge trained elsewhere and stored under FVQ's names."""
    bridge = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    raw = sd["quantize.embedding.weight"]
    k, c = raw.shape
    side = math.isqrt(k)
    width, patch, depth = config(name)
    dit = "pos_embed" in bridge
    x = F.conv2d(raw.permute(1, 0).reshape(1, c, side, side), bridge["x_embedder.proj.weight"],
                 bridge["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    if dit:
        x = x + bridge["pos_embed"]
        cond = F.silu(bridge["y_embedder.embedding_table.weight"][0:1])
    for i in range(depth):
        if dit:
            mod = _linear(bridge, f"blocks.{i}.adaLN_modulation.1", cond).chunk(6, dim=1)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m.unsqueeze(1) for m in mod)
            x = x + gate_a * _attention(bridge, f"blocks.{i}.attn", _ln(x) * (1 + scale_a) + shift_a, heads)
            x = x + gate_m * _mlp(bridge, f"blocks.{i}.mlp", _ln(x) * (1 + scale_m) + shift_m)
        else:
            x = x + _attention(bridge, f"blocks.{i}.attn", _ln(x), heads)
            x = x + _mlp(bridge, f"blocks.{i}.mlp", _ln(x))
    y = _ln(x)
    if dit:
        shift, scale = (m.unsqueeze(1) for m in _linear(bridge, "final_layer.adaLN_modulation.1", cond).chunk(2, dim=1))
        y = y * (1 + scale) + shift
    y = _linear(bridge, "final_layer.linear", y)
    n = side // patch
    grid = torch.einsum("nhwpqc->nchpwq", y.reshape(1, n, n, patch, patch, c)).reshape(1, c, side, side)
    return grid.reshape(1, c, k).permute(0, 2, 1)[0]


def quantize(latents: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """latents (b, C, h, w), codebook (K, C) -> (quantised latents (b, C, h, w), indices (b, h, w))."""
    z = latents.permute(0, 2, 3, 1)
    flat = z.reshape(-1, z.shape[-1])
    d = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
    indices = d.argmin(1)
    return codes[indices].view(z.shape).permute(0, 3, 1, 2), indices.view(z.shape[:3])
