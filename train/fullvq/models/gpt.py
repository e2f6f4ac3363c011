"""The class-conditional autoregressive generator: LlamaGen's GPT over a tokenizer's code grids.

    model = GPT(cfg.model, vocab_size, grid=(h, w), num_classes)
    logits = model(tokens, labels)          # (B, T) int64, (B,) int64 -> (B, T, V), teacher forcing
    loss = token_loss(logits, tokens)
    logits, k, v = model.prefill(labels)    # (B, V), (L, B, H, 1, hd) x 2: the class position
    logits, k, v = model.decode(token, pos, k_cache, v_cache)   # one more position (see decode)

Sequence: T = h * w tokens, the grid flattened row-major. Input position 0 holds the class embedding
(row `null_class` = num_classes is the unconditional branch for classifier-free guidance), input
position p >= 1 holds token p - 1, and the logits at position p predict token p. Blocks: pre-RMSNorm,
causal multi-head attention with 2D RoPE on q and k, pre-RMSNorm, SwiGLU; no biases anywhere.
Parameter names follow LlamaGen's (tok_embeddings, layers.i.attention.wqkv, feed_forward.w1 ...).

2D RoPE: the head dim is cut into pairs of adjacent channels, each pair rotated by its own angle; the
first half of the pairs turns with the row of the grid cell of the token at that position, the second
half with its column, at frequencies base^(-j / (hd / 4)), j < hd / 4. The class position is not
rotated (LlamaGen zeroes it instead, which erases the class token's q and k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..gpt_config import GPTModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table(grid: tuple[int, int], head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, hd / 2) float32: the angle of every channel pair at every input position.
    Row 0 (the class position) is the identity; row p >= 1 turns by the (row, col) of token p - 1."""
    h, w = grid
    freqs = base ** (-torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))
    cell = torch.arange(h * w - 1)
    angles = torch.cat([(cell // w)[:, None] * freqs, (cell % w)[:, None] * freqs], 1)
    angles = torch.cat([angles.new_zeros(1, head_dim // 2), angles])
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, hd) with channel pairs (2i, 2i + 1) rotated by cos, sin (S, hd / 2)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, dim) -> (out (B, S, dim), k (B, H, S, hd), v (B, H, S, hd)).

        Without `cache` the S positions attend causally among themselves. With cache = (k_cache,
        v_cache (B, H, T, hd), earlier (T,) bool), the one new position attends to the cached rows
        marked `earlier` and to itself."""
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).view(b, s, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = cached_attention(q, k, v, *cache)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, s, -1))), k, v


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     earlier: torch.Tensor) -> torch.Tensor:
    """One new position's attention: q, k, v (B, H, 1, hd) over the cached rows marked `earlier`
    (T,) bool of k_cache, v_cache (B, H, T, hd), and over itself -> (B, H, 1, hd).

    The softmax is split into the cached part and the new position, so the cache is only read
    (never merged with the new row into a cache-sized copy)."""
    scale = q.shape[-1] ** -0.5
    past = (q @ k_cache.transpose(-1, -2) * scale).masked_fill(~earlier, float("-inf"))  # (B, H, 1, T)
    new = (q * k).sum(-1, keepdim=True) * scale  # (B, H, 1, 1)
    weights = torch.cat([past, new], -1).softmax(-1)
    return weights[..., :-1] @ v_cache + weights[..., -1:] * v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_head, cfg.resid_dropout)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim, cfg.ffn_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, dim) -> (x (B, S, dim), k, v (B, H, S, hd)); `cache` as in Attention."""
        out, k, v = self.attention(self.attention_norm(x), cos, sin, cache)
        x = x + out
        return x + self.feed_forward(self.ffn_norm(x)), k, v


class GPT(nn.Module):
    """LlamaGen's class-conditional GPT (see the module docstring for the sequence layout).

    Weights start normal(0, init_std), RMSNorm weights at one, and the output head at zero
    (LlamaGen's choice: the first logits are uniform). `class_dropout` swaps labels for the null
    class in training mode only; token dropout hits the token embeddings, not the class one.
    """

    def __init__(self, model_cfg: GPTModelConfig, vocab_size: int, grid: tuple[int, int], num_classes: int):
        super().__init__()
        grid = tuple(grid)
        if vocab_size < 1 or num_classes < 1 or len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"vocab_size={vocab_size}, grid={grid}, num_classes={num_classes}: each must be "
                             f"positive (they come from the codes folder's meta.json)")
        if model_cfg.dim % model_cfg.n_head or (model_cfg.dim // model_cfg.n_head) % 4:
            raise ValueError(f"dim={model_cfg.dim} and n_head={model_cfg.n_head}: the head dim dim / n_head must "
                             f"be a whole multiple of 4 (2D RoPE turns pairs of channels, half by row, half by col)")
        self.vocab_size, self.grid, self.num_classes = vocab_size, grid, num_classes
        self.null_class = num_classes
        self.seq_len = grid[0] * grid[1]
        self.n_layer, self.n_head = model_cfg.n_layer, model_cfg.n_head
        self.head_dim = model_cfg.dim // model_cfg.n_head
        self.class_dropout = model_cfg.class_dropout
        self.tok_embeddings = nn.Embedding(vocab_size, model_cfg.dim)
        self.class_embedding = nn.Embedding(num_classes + 1, model_cfg.dim)
        self.token_dropout = nn.Dropout(model_cfg.token_dropout)
        self.layers = nn.ModuleList(Block(model_cfg) for _ in range(model_cfg.n_layer))
        self.norm = RMSNorm(model_cfg.dim, model_cfg.norm_eps)
        self.output = nn.Linear(model_cfg.dim, vocab_size, bias=False)
        cos, sin = rope_table(grid, self.head_dim, model_cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=model_cfg.init_std)
        nn.init.zeros_(self.output.weight)

    def cache_shape(self, rows: int) -> tuple[int, int, int, int, int]:
        """(L, rows, H, T, hd): the shape of each of k_cache and v_cache."""
        return self.n_layer, rows, self.n_head, self.seq_len, self.head_dim

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count, without the token and class embedding tables unless `embeddings`."""
        skip = set() if embeddings else {id(self.tok_embeddings.weight), id(self.class_embedding.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64, labels (B,) int64 (num_classes = the null class) -> logits (B, T, V) float32."""
        self._check(tokens, labels)
        if self.training and self.class_dropout > 0:
            labels = torch.where(torch.rand(labels.shape, device=labels.device) < self.class_dropout,
                                 self.null_class, labels)
        x = torch.cat([self.class_embedding(labels)[:, None],
                       self.token_dropout(self.tok_embeddings(tokens[:, :-1]))], 1)
        for layer in self.layers:
            x, _, _ = layer(x, self.rope_cos, self.rope_sin)
        return self.output(self.norm(x)).float()

    def prefill(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """labels (B,) int64 -> (logits (B, V) predicting token 0, k, v (L, B, H, 1, hd) of position 0).

        Inference path (call in eval mode); no checks on values, so that it exports as a graph."""
        x = self.class_embedding(labels)[:, None]
        keys, values = [], []
        for layer in self.layers:
            x, k, v = layer(x, self.rope_cos[:1], self.rope_sin[:1])
            keys.append(k)
            values.append(v)
        return self.output(self.norm(x[:, 0])).float(), torch.stack(keys), torch.stack(values)

    def decode(self, token: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor | Sequence[torch.Tensor],
               v_cache: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position: token (B,) int64 at sequence position pos (1,) int64, 1 <= pos <= T - 1,
        with k_cache, v_cache (L, B, H, T, hd), or sequences of L (B, H, T, hd) (one per layer),
        holding positions < pos (later rows get attention weight exactly 0: k_cache's may hold
        anything, v_cache's must be finite, e.g. zeros) -> (logits (B, V) predicting token pos, k, v
        (L, B, H, 1, hd) of position pos, for the caller to write into cache[..., pos, :]).

        Inference path (call in eval mode); `pos` is only used as a tensor, so that it exports."""
        k_layers, v_layers = list(k_cache), list(v_cache)  # a 5-D tensor's layers are views, not copies
        want = (self.n_head, self.seq_len, self.head_dim)
        for name, layers in (("k_cache", k_layers), ("v_cache", v_layers)):
            if len(layers) != self.n_layer or any(c.dim() != 4 or tuple(c.shape[1:]) != want for c in layers):
                got = [tuple(c.shape) for c in layers]
                raise ValueError(f"{name} holds layers of shapes {got}; expected {self.n_layer} layers of (B, H, T, "
                                 f"hd) with (H, T, hd) = {want}: allocate it with GPT.cache_shape(B)")
        earlier = torch.arange(self.seq_len, device=pos.device) < pos
        cos, sin = self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)
        x = self.tok_embeddings(token)[:, None]
        keys, values = [], []
        for layer, k_past, v_past in zip(self.layers, k_layers, v_layers):
            x, k, v = layer(x, cos, sin, (k_past, v_past, earlier))
            keys.append(k)
            values.append(v)
        return self.output(self.norm(x[:, 0])).float(), torch.stack(keys), torch.stack(values)

    def _check(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        h, w = self.grid
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len or tokens.dtype != torch.int64:
            raise ValueError(f"tokens are {tokens.dtype} of shape {tuple(tokens.shape)}; expected int64 (B, "
                             f"{self.seq_len}): a {h} x {w} code grid flattened row-major")
        if labels.shape != tokens.shape[:1] or labels.dtype != torch.int64:
            raise ValueError(f"labels are {labels.dtype} of shape {tuple(labels.shape)}; expected int64 "
                             f"({tokens.shape[0]},): one class per row of tokens")
        if len(labels) and bool(((labels < 0) | (labels > self.null_class)).any()):
            raise ValueError(f"labels range over [{int(labels.min())}, {int(labels.max())}]; expected classes in "
                             f"[0, {self.num_classes}) or the null class {self.null_class}")
        if tokens.numel() and bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f"tokens range over [{int(tokens.min())}, {int(tokens.max())}]; expected codes in "
                             f"[0, {self.vocab_size}): were the codes made by another tokenizer?")


def token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits (B, T, V) against the tokens (B, T) they predict (float32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
