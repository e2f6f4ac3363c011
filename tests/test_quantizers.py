"""The quantizer contract, the bridge, and the detached argmin."""

import pytest
import torch

from fullvq.config import QuantizerConfig
from fullvq.lookup import chunked_argmin, nearest_codes
from fullvq.metrics import CodeCounter
from fullvq.quantizers import QuantOut, VQBridge, build_quantizer
from fullvq.quantizers.bridge import check_grid, fvq_bridge_for, legacy_bridge_name, parse_bridge

NAMES = ["vq", "ema", "fc", "simvq", "bridge", "lc"]


@pytest.fixture
def lc_file(tmp_path):
    path = tmp_path / "lc.pt"
    torch.save({"format": "fullvq-lc-codebook", "version": 1, "codebook": torch.randn(256, 24)}, path)
    return str(path)


def make(name, lc_file, **kw):
    cfg = QuantizerConfig(name=name, codebook_size=256, codebook_dim=8, bridge="XS/4", lc_codebook=lc_file, **kw)
    return build_quantizer(cfg)


@pytest.mark.parametrize("name", NAMES)
def test_contract(name, lc_file):
    torch.manual_seed(0)
    q = make(name, lc_file)
    z = torch.randn(3, 8, 5, 4, requires_grad=True)
    codes = q.bake()  # before the forward pass, which moves the ema codebook
    out = q(z)
    assert isinstance(out, QuantOut)
    assert out.z_q.shape == z.shape and out.indices.shape == (3, 5, 4) and out.indices.dtype == torch.long
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert codes.shape == (256, 8) and codes.dtype == torch.float32 and not codes.requires_grad
    # z_q holds exactly the chosen (normalised) codes, and they are the nearest ones
    flat = q.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 8))
    torch.testing.assert_close(out.z_q.detach().permute(0, 2, 3, 1).reshape(-1, 8), codes[out.indices.reshape(-1)])
    assert torch.equal(out.indices.reshape(-1), chunked_argmin(flat, codes, q.metric))


@pytest.mark.parametrize("name", NAMES)
def test_straight_through_gradient(name, lc_file):
    q = make(name, lc_file)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    weights = torch.randn_like(out.z_q)
    (out.z_q * weights).sum().backward()
    if name == "fc":  # through the l2 normalisation: nonzero, not the identity
        assert z.grad.abs().sum() > 0
    else:
        torch.testing.assert_close(z.grad, weights)


def test_bridge_gives_every_raw_code_a_gradient(lc_file):
    q = make("bridge", lc_file)
    with torch.no_grad():  # a trained head, so that gradients pass back through the ViT
        q.bridge.head.weight.normal_(std=0.02)
    out = q(torch.randn(2, 8, 4, 4))
    out.loss.backward()
    assert len(out.indices.unique()) < 256  # a sparse assignment...
    assert (q.raw.grad.abs().sum(1) > 0).all()  # ...still reaches every raw code


@pytest.mark.parametrize("name", ["lc", "simvq"])
def test_frozen_codebooks_get_no_gradient(name, lc_file):
    q = make(name, lc_file)
    q(torch.randn(2, 8, 4, 4)).loss.backward()
    assert not q.frozen.requires_grad and q.frozen.grad is None
    assert q.projector.weight.grad.abs().sum() > 0


def test_bridge_outputs_zeros_at_initialisation():
    bridge = VQBridge(1024, 8, *parse_bridge("S/8"), head_init_std=0.0)  # FVQ's exact zero head
    assert torch.equal(bridge(torch.randn(1024, 8)), torch.zeros(1024, 8))
    codes = VQBridge(1024, 8, *parse_bridge("XS/4"), head_init_std=1e-3)(torch.randn(1024, 8))  # fullvq's default
    assert codes.abs().max() < 0.05 and len(torch.unique(codes, dim=0)) == 1024


def test_fvq_initialisation():
    """FVQ's: raw codes uniform in +-1/K (vq_model_qbridge_release.py), every linear layer and the
    patch embedding (as a linear map of the flattened patch) xavier-uniform with zero bias, the head
    as bridge_head_init_std says (0: exactly zero)."""
    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(name="bridge", codebook_size=4096, codebook_dim=8, bridge="L/8",
                                        bridge_init="fvq", bridge_head_init_std=0.0))
    assert q.raw.abs().max() <= 1 / 4096 and q.raw.abs().max() > 0.9 / 4096 and q.raw.std() > 0.5 / 4096 / 3**0.5
    b = q.bridge
    layers = {"patch_embed": b.patch_embed, "qkv": b.blocks[0].qkv, "fc1": b.blocks[1].mlp[0]}
    for name, layer in layers.items():
        fan_out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound, name
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias)), name
    assert torch.equal(b.head.weight, torch.zeros_like(b.head.weight)) and not b.head.bias.any()
    fullvq = build_quantizer(QuantizerConfig(name="bridge", codebook_size=4096, codebook_dim=8, bridge="L/8"))
    assert float(fullvq.raw.detach().std()) == pytest.approx(1, abs=0.05)
    assert fullvq.bridge.blocks[0].qkv.bias.abs().max() > 0
    assert float(fullvq.bridge.head.weight.detach().std()) == pytest.approx(1e-3, rel=0.05)
    with pytest.raises(ValueError, match="unknown bridge initialisation 'xavier'.*'fullvq', 'fvq'"):
        build_quantizer(QuantizerConfig(name="bridge", codebook_size=256, codebook_dim=8, bridge="XS/4",
                                        bridge_init="xavier"))


def test_bridge_keeps_codes_in_their_grid_patch():
    # Without the ViT blocks' mixing, output code k may depend only on the raw codes of its own
    # p x p patch of the sqrt(K) x sqrt(K) grid (code k at row k // side, column k % side).
    bridge = VQBridge(256, 3, *parse_bridge("XS/4"))
    with torch.no_grad():
        for block in bridge.blocks:
            block.proj.weight.zero_(), block.proj.bias.zero_(), block.mlp[2].weight.zero_(), block.mlp[2].bias.zero_()
        bridge.head.weight.normal_()
    raw = torch.randn(256, 3)
    base = bridge(raw)

    def patch_of(k):
        return k // 16 // 4, k % 16 // 4

    for k in (0, 5, 77, 255):
        bumped = raw.clone()
        bumped[k] += 1.0
        changed = (bridge(bumped) - base).abs().sum(1) > 1e-6
        same_patch = torch.tensor([patch_of(j) == patch_of(k) for j in range(256)])
        assert changed[k] and torch.equal(changed, changed & same_patch) and changed.sum() > 1


def test_dead_positions_counts_patch_positions_without_a_used_code():
    # K = 256: a 16 x 16 grid of 4 x 4 patches. Code k sits at row k // 16, column k % 16, so its
    # position within its patch is (row % 4, column % 4); the head slice of that position makes it.
    quantizer = build_quantizer(QuantizerConfig(name="bridge", codebook_size=256, codebook_dim=3, bridge="XS/4"))
    rows, cols = torch.arange(256) // 16, torch.arange(256) % 16
    counts = torch.ones(256, dtype=torch.long)
    assert quantizer.dead_positions(counts) == 0
    counts[(rows % 4 == 1) & (cols % 4 == 2)] = 0  # every code at position (1, 2) unused
    assert quantizer.dead_positions(counts) == 1
    counts[(rows % 4 == 3) & (cols % 4 == 0) & (rows > 3)] = 0  # position (3, 0) keeps row 3: alive
    assert quantizer.dead_positions(counts) == 1


@pytest.mark.parametrize("k,patch,message", [(1000, 4, "not a perfect square.*use e.g. 784 or 1024"),
                                             (900, 4, "has side 30, not divisible by 4.*784 or 1024")])
def test_invalid_bridge_codebook_sizes(k, patch, message):
    with pytest.raises(ValueError, match=message):
        check_grid(k, patch)


def test_bridge_names_are_fvqs():
    """qbridge_ViT.py: XS..XL = 4 heads of 8..128 channels, depth 2 (-d1, -d4), MLP ratio 2, patch 2/4/8."""
    assert parse_bridge("L/8") == (256, 2, 4, 8)
    assert parse_bridge("QBridge-L/4") == parse_bridge("l/4") == (256, 2, 4, 4)
    assert parse_bridge("XS/2") == (32, 2, 4, 2) and parse_bridge("XL/4-d4") == (512, 4, 4, 4)
    assert parse_bridge("Qbridge-S/4-d4") == (64, 4, 4, 4) and parse_bridge("B/4-d1") == (128, 1, 4, 4)
    assert VQBridge(4096, 8, *parse_bridge("L/8")).blocks[0].mlp[0].out_features == 512
    assert parse_bridge("W128-H2-D2/16") == (128, 2, 2, 16)
    for bad in ("M/4", "L/16", "L/8-d3", "W100-H3-D2/8", "XS", "auto"):
        with pytest.raises(ValueError, match=f"unknown bridge '{bad}'.*FVQ's names.*W<width>-H<heads>-D<depth>"):
            parse_bridge(bad)


def test_bridge_layer_norms_are_fvqs():
    bridge = VQBridge(1024, 8, *parse_bridge("B/4"))
    norms = [m for m in bridge.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(m.eps == 1e-6 and not m.elementwise_affine for m in norms)


def test_auto_bridge_is_fvqs_choice_for_k():
    assert fvq_bridge_for(16384) == "L/4" and fvq_bridge_for(65536) == fvq_bridge_for(262144) == "L/8"
    q = build_quantizer(QuantizerConfig(name="bridge", codebook_size=1024, codebook_dim=8, bridge="auto"))
    assert q.bridge.patch == 4 and q.bridge.patch_embed.out_channels == 256


def test_legacy_names_spell_out_fullvq_01_sizes():
    assert legacy_bridge_name("XS/8") == "W128-H2-D2/8" and legacy_bridge_name("L/16") == "W768-H12-D6/16"
    assert legacy_bridge_name("W128-H4-D2/16") == "W128-H4-D2/16"


def test_ema_codebook_moves_towards_assigned_latents():
    q = build_quantizer(QuantizerConfig(name="ema", codebook_size=4, codebook_dim=2, ema_decay=0.5))
    target = torch.tensor([3.0, -2.0])
    for _ in range(30):
        out = q(target.view(1, 2, 1, 1).expand(4, 2, 2, 2).contiguous())
    torch.testing.assert_close(q.codebook()[out.indices[0, 0, 0]], target, atol=1e-3, rtol=0)


def test_entropy_loss_only_when_weighted(lc_file):
    off = make("vq", lc_file)(torch.randn(2, 8, 2, 2))
    on = make("vq", lc_file, entropy_weight=0.1)(torch.randn(2, 8, 2, 2))
    assert "entropy_loss" not in off.stats and torch.isfinite(on.stats["entropy_loss"])


def test_lc_needs_a_matching_codebook_file(lc_file, tmp_path):
    with pytest.raises(ValueError, match="needs quantizer.lc_codebook=PATH.*build_lc_codebook.py"):
        make("lc", "")
    with pytest.raises(ValueError, match="holds 256 codes but codebook_size is 512"):
        build_quantizer(QuantizerConfig(name="lc", codebook_size=512, lc_codebook=lc_file))
    with pytest.raises(ValueError, match="does not exist"):
        make("lc", str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_chunked_argmin_equals_full_argmin(metric):
    torch.manual_seed(0)
    z, codes = torch.randn(500, 8), torch.randn(3000, 8)
    full = chunked_argmin(z, codes, metric, chunk_elements=10**9)
    assert torch.equal(chunked_argmin(z, codes, metric, chunk_elements=7 * 3000), full)
    assert torch.equal(nearest_codes(z, codes, metric), full)
    if metric == "l2":
        assert torch.equal(full, torch.cdist(z.double(), codes.double()).argmin(1))


def test_usage_is_counted_exactly():
    counter = CodeCounter(10)
    counter.add(torch.tensor([[1, 1, 2], [9, 1, 2]]))
    counter.add(torch.tensor([3]))
    assert counter.num_tokens == 7 and counter.usage == pytest.approx(0.4) and counter.dead_codes == 6
    uniform = CodeCounter(4)
    uniform.add(torch.arange(4).repeat(5))
    assert uniform.perplexity == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------------
# residual VQ (quantizer.residual_depth)


@pytest.mark.parametrize("name", ["vq", "simvq"])
def test_residual_stages_quantise_what_the_earlier_ones_left(name, lc_file):
    torch.manual_seed(0)
    q = make(name, lc_file, residual_depth=3)
    z = torch.randn(2, 8, 4, 3)
    out = q(z)
    books = q.bake()
    assert out.indices.shape == (2, 4, 3, 3) and books.shape == (3, 256, 8)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    ids = out.indices.reshape(-1, 3)
    residual, total = flat, torch.zeros_like(flat)
    for stage in range(3):  # each stage picks the nearest of its own codes to what is left
        assert torch.equal(ids[:, stage], chunked_argmin(residual, books[stage], "l2"))
        chosen = books[stage][ids[:, stage]]
        residual, total = residual - chosen, total + chosen
    torch.testing.assert_close(out.z_q.detach().permute(0, 2, 3, 1).reshape(-1, 8), total)
    assert (flat - total).norm() < (flat - books[0][ids[:, 0]]).norm()  # the later stages reduce the error
    assert set(out.stats) >= {f"{k}_{i}" for k in make(name, lc_file)(z).stats for i in range(3)}


def test_residual_straight_through_passes_the_gradient_once(lc_file):
    # d z_q / d z = I, as for one stage: a copy per stage would scale the encoder's gradient by depth.
    q = make("vq", lc_file, residual_depth=3)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    weights = torch.randn(2, 8, 3, 3)
    (q(z).z_q * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)


def test_residual_commitment_reaches_the_encoder_from_every_stage(lc_file):
    # stage i's commitment is |z - (codes of stages < i) - code_i|^2: the encoder is pulled towards
    # the sum of codes so far at every stage, so the loss of depth 2 has a gradient the first lacks.
    torch.manual_seed(1)
    q = make("vq", lc_file, residual_depth=2)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    (grad_all,) = torch.autograd.grad(out.loss, z, retain_graph=True)
    first = q.stages[0](z)
    (grad_first,) = torch.autograd.grad(first.loss, z)
    assert not torch.allclose(grad_all, grad_first)


def test_residual_usage_counts_each_stage_on_its_own_codebook():
    # stage 0 uses codes {0, 1}, stage 1 code {1}: 3 of the 2 x 4 (stage, code) pairs, not 2 of 4 codes
    counter = CodeCounter(4, depth=2)
    counter.add(torch.tensor([[[0, 1], [1, 1]]]))
    assert counter.counts.tolist() == [1, 1, 0, 0, 0, 2, 0, 0]
    assert counter.usage == 3 / 8 and counter.num_tokens == 2 and counter.dead_codes == 5
    assert counter.perplexity == pytest.approx((2 * 1) ** 0.5)  # geometric mean of the stages' 2 and 1
    with pytest.raises(ValueError, match=r"expected indices \(\.\.\., 2\)"):
        counter.add(torch.tensor([0, 1, 2]))

