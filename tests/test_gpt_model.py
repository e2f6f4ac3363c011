"""The generator GPT: teacher forcing equals the cached decode loop, causality, 2D RoPE, dropouts,
preset sizes (LlamaGen's GPT-B/L/XL) and input errors."""

import math

import pytest

torch = pytest.importorskip("torch")

from fullvq.gpt_config import GPT_PRESETS, GPTModelConfig, gpt_preset
from fullvq.models.gpt import GPT, apply_rope, rope_table, token_loss

V, GRID, CLASSES = 50, (3, 4), 5
T = GRID[0] * GRID[1]


def tiny(seed: int = 0, **model) -> GPT:
    """A random tiny GPT in eval mode whose output head is not zero (so logits differ between tokens)."""
    torch.manual_seed(seed)
    gpt = GPT(GPTModelConfig(dim=32, n_layer=2, n_head=2, **model), V, GRID, CLASSES).eval()
    with torch.no_grad():
        gpt.output.weight.normal_(0, 0.5)
    return gpt


def batch(rows: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (rows, T), generator=g), torch.randint(CLASSES + 1, (rows,), generator=g)


def test_forward_equals_prefill_then_cached_decode():
    gpt = tiny()
    tokens, labels = batch(4)
    labels[0] = gpt.null_class
    with torch.no_grad():
        want = gpt(tokens, labels)
        logits, k, v = gpt.prefill(labels)
        assert logits.shape == (4, V) and k.shape == v.shape == (2, 4, 2, 1, 16)
        # rows at and after the current position must not matter: any keys, any finite values
        k_cache, v_cache = torch.full(gpt.cache_shape(4), math.nan), torch.full(gpt.cache_shape(4), 1e30)
        got = [logits]
        for pos in range(1, T):
            k_cache[:, :, :, pos - 1:pos], v_cache[:, :, :, pos - 1:pos] = k, v
            logits, k, v = gpt.decode(tokens[:, pos - 1], torch.tensor([pos]), k_cache, v_cache)
            got.append(logits)
    assert want.shape == (4, T, V) and want.dtype == torch.float32
    torch.testing.assert_close(torch.stack(got, 1), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("j", [0, 5, T - 2])
def test_changing_token_j_changes_no_logits_up_to_j(j):
    gpt = tiny()
    tokens, labels = batch()
    changed = tokens.clone()
    changed[:, j] = (tokens[:, j] + 1) % V
    with torch.no_grad():
        a, b = gpt(tokens, labels), gpt(changed, labels)
    torch.testing.assert_close(a[:, :j + 1], b[:, :j + 1], atol=0, rtol=0)
    assert (a[:, j + 1] - b[:, j + 1]).abs().amax(-1).min() > 1e-4


def test_last_token_is_never_an_input():
    gpt = tiny()
    tokens, labels = batch()
    changed = tokens.clone()
    changed[:, -1] = (tokens[:, -1] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(gpt(tokens, labels), gpt(changed, labels), atol=0, rtol=0)


def test_rope_table_class_position_unrotated_then_row_and_column():
    hd, w = 16, GRID[1]
    cos, sin = rope_table(GRID, hd, 10000.0)
    assert cos.shape == sin.shape == (T, hd // 2)
    assert torch.equal(cos[0], torch.ones(hd // 2)) and torch.equal(sin[0], torch.zeros(hd // 2))
    freqs = 10000.0 ** (-torch.arange(hd // 4, dtype=torch.float64) / (hd // 4))
    for p in range(1, T):
        r, c = divmod(p - 1, w)
        angles = torch.cat([r * freqs, c * freqs])
        torch.testing.assert_close(cos[p], angles.cos().float())
        torch.testing.assert_close(sin[p], angles.sin().float())
    x = torch.randn(1, 1, 1, hd)
    assert torch.equal(apply_rope(x, cos[:1], sin[:1]), x)


def test_rope_scores_depend_on_the_row_and_column_offset_only():
    hd, grid = 16, (5, 5)   # the table covers cells up to (4, 3): the last token is never an input
    cos, sin = rope_table(grid, hd, 10000.0)
    q, k = torch.randn(2, 1, 1, 1, hd).unbind()

    def score(cell_q, cell_k):
        pq, pk = 1 + cell_q[0] * grid[1] + cell_q[1], 1 + cell_k[0] * grid[1] + cell_k[1]
        return (apply_rope(q, cos[pq:pq + 1], sin[pq:pq + 1]) * apply_rope(k, cos[pk:pk + 1], sin[pk:pk + 1])).sum()

    base = score((1, 3), (0, 1))
    torch.testing.assert_close(score((4, 3), (3, 1)), base)   # same (drow, dcol) = (1, 2)
    assert abs(score((1, 4), (0, 1)) - base) > 1e-4             # another column offset
    assert abs(score((2, 3), (0, 1)) - base) > 1e-4             # another row offset


def test_class_dropout_replaces_labels_in_training_only():
    gpt = tiny(class_dropout=1.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    tokens, labels = batch()
    labels = labels.clamp(max=CLASSES - 1)
    null = torch.full_like(labels, gpt.null_class)
    with torch.no_grad():
        conditional, unconditional = gpt(tokens, labels), gpt(tokens, null)
        gpt.train()
        dropped = gpt(tokens, labels)
    torch.testing.assert_close(dropped, unconditional, atol=0, rtol=0)
    assert (conditional - unconditional).abs().max() > 1e-3


def test_token_dropout_spares_the_class_position():
    gpt = tiny(class_dropout=0.0, token_dropout=1.0, resid_dropout=0.0, ffn_dropout=0.0)
    tokens, labels = batch()
    with torch.no_grad():
        evaluated = gpt(tokens, labels)
        gpt.train()
        dropped, other = gpt(tokens, labels), gpt((tokens + 1) % V, labels)
    torch.testing.assert_close(dropped[:, 0], evaluated[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(dropped, other, atol=0, rtol=0)   # every token embedding was dropped
    assert (dropped[:, 1:] - evaluated[:, 1:]).abs().max() > 1e-3


def test_init_zero_head_gives_uniform_loss_and_gradients():
    torch.manual_seed(0)
    gpt = GPT(GPTModelConfig(dim=32, n_layer=2, n_head=2), V, GRID, CLASSES)
    assert not gpt.output.weight.any()
    for weight in (gpt.tok_embeddings.weight, gpt.class_embedding.weight, gpt.layers[0].feed_forward.w1.weight):
        assert 0.015 < weight.std() < 0.025
    tokens, labels = batch()
    loss = token_loss(gpt(tokens, labels), tokens)
    assert loss.item() == pytest.approx(math.log(V), abs=1e-5)
    loss.backward()
    assert gpt.output.weight.grad.abs().max() > 0
    assert not any(k.startswith("rope") for k in gpt.state_dict())


def test_preset_hidden_dims_and_llamagen_sizes():
    # LlamaGen's GPT-B / L / XL (class-conditional, 16 x 16 tokens, 16384 codes, 1000 classes):
    # 111M / 343M / 775M parameters in its paper; every weight counted here
    want = {"tiny": (512, None), "B": (2048, 110_888_448), "L": (2816, 342_910_976), "XL": (3584, 774_699_520)}
    assert set(want) == set(GPT_PRESETS)
    for name, (hidden, params) in want.items():
        cfg = gpt_preset(name)
        assert cfg.model.hidden_dim == hidden
        if params:
            with torch.device("meta"):
                assert GPT(cfg.model, 16384, (16, 16), 1000).num_params() == params
    with torch.device("meta"):
        tiny_gpt = GPT(gpt_preset("tiny").model, 1024, (4, 4), 11)
    assert tiny_gpt.num_params(embeddings=False) == tiny_gpt.num_params() - (1024 + 12) * 128


@pytest.mark.parametrize("tokens, labels, match", [
    (torch.zeros(2, T - 1, dtype=torch.long), torch.zeros(2, dtype=torch.long), r"tokens.*\(2, 11\).*\(B, 12\)"),
    (torch.zeros(2, T, dtype=torch.int32), torch.zeros(2, dtype=torch.long), "tokens are torch.int32"),
    (torch.zeros(2, T, dtype=torch.long), torch.zeros(3, dtype=torch.long), r"labels.*\(3,\).*\(2,\)"),
    (torch.zeros(2, T, dtype=torch.long), torch.tensor([0, CLASSES + 1]), r"labels range over \[0, 6\]"),
    (torch.zeros(2, T, dtype=torch.long), torch.tensor([-1, 0]), "labels range"),
    (torch.full((2, T), V, dtype=torch.long), torch.zeros(2, dtype=torch.long), r"tokens range over \[50, 50\]"),
])
def test_bad_inputs_are_value_errors_naming_them(tokens, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny()(tokens, labels)


def test_bad_cache_and_shapes_are_value_errors():
    gpt = tiny()
    cache = torch.zeros(gpt.cache_shape(2))
    token, pos = torch.zeros(2, dtype=torch.long), torch.tensor([1])
    with pytest.raises(ValueError, match="v_cache holds layers of shapes .*expected 2 layers of"):
        gpt.decode(token, pos, cache, cache[:, :, :, :-1])
    with pytest.raises(ValueError, match="k_cache holds layers of shapes \\[\\(2, 2, 12, 16\\)\\]; expected 2"):
        gpt.decode(token, pos, [cache[0]], cache)
    with pytest.raises(ValueError, match="multiple of 4"):
        GPT(GPTModelConfig(dim=24, n_head=4), V, GRID, CLASSES)
    with pytest.raises(ValueError, match="grid"):
        GPT(GPTModelConfig(dim=32, n_head=2), V, (0, 4), CLASSES)
