"""The LlamaGen-structured VQ autoencoder: shapes, VQ-16 size and state dict keys, decode_codes."""

from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")
from torch import nn

from fullvq.models.autoencoder import AttnBlock, Decoder, Encoder, VQModel, swish

VQ16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256)
TINY = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, norm_groups=8)

# LlamaGen VQ-16 without its codebook: encoder 29,298,176 + decoder 42,449,795
# + quant_conv (256*8+8 = 2,056) + post_quant_conv (8*256+256 = 2,304), summed layer by layer
# from tokenizer/tokenizer_image/vq_model.py (the 16384 x 8 codebook adds 131,072 more).
VQ16_PARAMS = 71_752_331


@dataclass
class Out:
    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict = field(default_factory=dict)


class IdentityQuantizer(nn.Module):
    """Stand-in for the real quantizers: z_q = z, every index 0, zero loss."""

    def forward(self, z):
        b, _, h, w = z.shape
        return Out(z, torch.zeros(b, h, w, dtype=torch.long), z.new_zeros(()))


def build(cfg, codebook_dim=8):
    return VQModel(Encoder(**cfg), Decoder(**cfg), IdentityQuantizer(), codebook_dim)


@pytest.fixture(scope="module")
def vq16():
    torch.manual_seed(0)
    return build(VQ16).eval()


def test_vq16_shapes(vq16):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert vq16.encoder(x).shape == (1, 256, 4, 4)
        rec, out = vq16(x)
    assert out.z_q.shape == (1, 8, 4, 4) and out.indices.shape == (1, 4, 4)
    assert rec.shape == x.shape


def test_tiny_shapes_and_backward():
    torch.manual_seed(0)
    model = build(TINY)
    x = torch.randn(2, 3, 32, 32)
    rec, out = model(x)
    assert out.z_q.shape == (2, 8, 8, 8) and rec.shape == x.shape
    (rec - x).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vq16_param_count(vq16):
    assert sum(p.numel() for p in vq16.encoder.parameters()) == 29_298_176
    assert sum(p.numel() for p in vq16.decoder.parameters()) == 42_449_795
    assert sum(p.numel() for p in vq16.parameters()) == VQ16_PARAMS


def test_vq16_llamagen_key_names(vq16):
    keys = set(vq16.state_dict())
    expected = {
        "encoder.conv_in.weight",
        "encoder.conv_blocks.0.res.0.norm1.weight",
        "encoder.conv_blocks.0.res.1.conv2.bias",
        "encoder.conv_blocks.0.downsample.conv.weight",
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight",
        "encoder.conv_blocks.4.res.0.nin_shortcut.weight",
        "encoder.conv_blocks.4.attn.1.norm.weight",
        "encoder.conv_blocks.4.attn.1.proj_out.weight",
        "encoder.mid.0.norm2.bias",
        "encoder.mid.1.q.weight",
        "encoder.mid.1.k.bias",
        "encoder.mid.2.conv1.weight",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.mid.1.v.weight",
        "decoder.conv_blocks.0.res.2.conv1.weight",
        "decoder.conv_blocks.0.attn.2.proj_out.weight",
        "decoder.conv_blocks.0.upsample.conv.weight",
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight",
        "decoder.conv_blocks.4.res.2.norm2.weight",
        "decoder.norm_out.bias",
        "decoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    }
    assert expected <= keys, sorted(expected - keys)
    # attention only at the lowest resolution, resampling everywhere but the ends
    absent = {
        "encoder.conv_blocks.0.attn.0.q.weight",
        "encoder.conv_blocks.4.downsample.conv.weight",
        "decoder.conv_blocks.4.attn.0.proj_out.weight",
        "decoder.conv_blocks.4.upsample.conv.weight",
        "encoder.conv_blocks.0.res.0.nin_shortcut.weight",
    }
    assert not absent & keys


def test_decode_codes_matches_decode():
    torch.manual_seed(0)
    model = build(TINY).eval()
    codebook = torch.randn(10, 8)
    indices = torch.randint(10, (2, 8, 8))
    with torch.no_grad():
        expected = model.decode(codebook[indices].permute(0, 3, 1, 2))
        torch.testing.assert_close(model.decode_codes(indices, codebook), expected)


def test_attention_is_single_head_scaled_softmax():
    torch.manual_seed(0)
    attn = AttnBlock(16, norm_groups=4).eval()
    x = torch.randn(2, 16, 3, 5)
    y = attn.norm(x)
    q, k, v = (conv(y).flatten(2) for conv in (attn.q, attn.k, attn.v))  # (b, c, n)
    weights = torch.softmax(q.transpose(1, 2) @ k / 16**0.5, dim=-1)  # (b, n_q, n_k)
    expected = x + attn.proj_out((v @ weights.transpose(1, 2)).reshape(x.shape))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("module", [Encoder, Decoder])
def test_indivisible_norm_groups_raises(module):
    with pytest.raises(ValueError, match="norm_groups"):
        module(ch=24, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, norm_groups=16)


def test_mismatched_z_channels_raises():
    with pytest.raises(ValueError, match="z_channels"):
        VQModel(Encoder(**TINY), Decoder(**{**TINY, "z_channels": 64}), IdentityQuantizer(), 8)


def test_swish_is_llamagens_x_times_sigmoid_in_value_and_gradient():
    x = torch.linspace(-30, 30, 100_001, dtype=torch.float32, requires_grad=True)
    ours, theirs = swish(x), x * torch.sigmoid(x)
    # both round an exp, a division and a product, in different orders and vector kernels: a few
    # float32 ulps apart (8 allowed), near zero an absolute 1e-7; another activation is off by 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    grad_ours, = torch.autograd.grad(ours.sum(), x)
    grad_theirs, = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-6, atol=1e-7)

