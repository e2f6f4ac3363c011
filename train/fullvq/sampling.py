"""The reference sampler of the generator, in PyTorch: what fullvq_rt's sampler must reproduce.

    tokens = generate(model, labels, cfg_scale=4.0, temperature=1.0, top_k=0, top_p=1.0, seed=0)

One step: classifier-free guidance (logit rows [0, B) conditional, [B, 2B) the null class; guided =
uncond + s * (cond - uncond), only when cfg_scale != 1), temperature, top-k, then top-p on the
softmax of the kept logits: the smallest set of most probable tokens whose mass reaches top_p. Ties
in both go to the lower token index. The loop: prefill the class position, then decode one position
at a time into a preallocated (L, R, H, T, hd) KV cache; the token drawn is fed to both CFG halves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_sampling(cfg_scale: float, temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the first sampling parameter out of its range."""
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale={cfg_scale}: expected a finite value >= 0 (1.0 turns guidance off)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature}: expected a finite value > 0")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: expected an integer >= 0 (0 turns top-k off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected a value in (0, 1] (1 turns top-p off)")


def filter_logits(logits: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """logits (R, V) -> log-probabilities (B, V) float32 of the distribution a step draws from,
    -inf for the tokens filtered out. R = 2B with guidance (cfg_scale != 1), else R = B."""
    check_sampling(cfg_scale, temperature, top_k, top_p)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; expected (R, V) with V >= 1")
    x = logits.float()
    if cfg_scale != 1:
        if len(x) % 2:
            raise ValueError(f"cfg_scale={cfg_scale} needs an even number of logit rows (conditional, then "
                             f"unconditional); got {len(x)}")
        cond, uncond = x.chunk(2)
        x = uncond + cfg_scale * (cond - uncond)
    x = x / temperature
    if 0 < top_k < x.shape[1] or top_p < 1:
        x = _truncate(x, top_k, top_p)
    return x.log_softmax(-1)


def _truncate(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """x (B, V) with the logits outside top-k, then outside the top-p nucleus, set to -inf."""
    ranked, order = x.sort(dim=-1, descending=True, stable=True)   # equal logits: lower index first
    keep = torch.ones_like(ranked, dtype=torch.bool)
    if 0 < top_k < x.shape[1]:
        keep[:, top_k:] = False
    if top_p < 1:
        probs = ranked.masked_fill(~keep, -math.inf).softmax(-1)
        mass_before = F.pad(probs.cumsum(-1)[:, :-1], (1, 0))
        keep &= mass_before < top_p
    return torch.full_like(x, -math.inf).scatter(-1, order, ranked.masked_fill(~keep, -math.inf))


def sample_logits(logits: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (R, V) -> tokens (B,) int64 drawn from filter_logits(...) with `generator`."""
    probs = filter_logits(logits, cfg_scale, temperature, top_k, top_p).exp()
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, labels: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None) -> torch.Tensor:
    """labels (B,) int64 classes -> tokens (B, T) int64 sampled from `model` (a fullvq GPT) on its
    device, row-major over its grid. Greedy decoding is top_k=1. `seed` None draws a fresh seed.
    The model runs in eval mode (its mode is restored afterwards)."""
    check_sampling(cfg_scale, temperature, top_k, top_p)
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels are {labels.dtype} of shape {tuple(labels.shape)}; expected int64 (B,)")
    if len(labels) and bool(((labels < 0) | (labels >= model.num_classes)).any()):
        raise ValueError(f"unknown class in labels (range [{int(labels.min())}, {int(labels.max())}]): the model "
                         f"knows classes 0 .. {model.num_classes - 1}")
    device = model.rope_cos.device
    labels = labels.to(device)
    guided = cfg_scale != 1
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    k_cache = torch.zeros(model.cache_shape(len(rows)), device=device)
    v_cache = torch.zeros_like(k_cache)
    tokens = torch.empty(len(labels), model.seq_len, dtype=torch.int64, device=device)
    training = model.training
    model.eval()
    try:
        logits, k, v = model.prefill(rows)
        for pos in range(model.seq_len):
            k_cache[:, :, :, pos:pos + 1] = k
            v_cache[:, :, :, pos:pos + 1] = v
            tokens[:, pos] = sample_logits(logits, cfg_scale, temperature, top_k, top_p, generator)
            if pos + 1 < model.seq_len:
                feed = tokens[:, pos].repeat(2 if guided else 1)
                logits, k, v = model.decode(feed, torch.tensor([pos + 1], device=device), k_cache, v_cache)
    finally:
        model.train(training)
    return tokens
