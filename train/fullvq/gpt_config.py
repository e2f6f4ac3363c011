"""Configuration of the autoregressive generator (train/gpt.py): plain dataclasses and presets.

Same conventions as fullvq.config: `key=value` overrides (fullvq.config.apply_override works on
these dataclasses too) and a plain-dict copy in every checkpoint. The vocabulary, the token grid
and the number of classes come from the codes folder (train/extract_codes.py) when training starts,
so a checkpoint alone rebuilds the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import _from_dict


@dataclass
class GPTModelConfig:
    """Llama blocks: pre-RMSNorm, SwiGLU, no biases, 2D RoPE (LlamaGen's GPT-B/L/XL sizes)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    ffn_dim: int = 0                 # 0: LlamaGen's rule, 2/3 * 4 * dim rounded up to a multiple of 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    class_dropout: float = 0.1       # label -> null class (trains the unconditional branch for CFG)
    token_dropout: float = 0.1       # dropout on the input token embeddings
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    init_std: float = 0.02

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or -(-int(2 * 4 * self.dim / 3) // 256) * 256


@dataclass
class GPTConfig:
    preset: str = "tiny"
    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    # data: a folder written by train/extract_codes.py; the three fields below are read from it
    codes: str = ""
    vocab_size: int = 0
    grid: tuple[int, int] = (0, 0)
    num_classes: int = 0
    tokenizer: str = ""              # the tokenizer checkpoint that made the codes (sample.py decodes with it)
    # optimisation (LlamaGen: AdamW, betas 0.9/0.95, weight decay 0.05 on >= 2-D weights, clip 1.0)
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    schedule: str = "constant"       # as fullvq.schedule.lr_factor: "constant", "cosine" or "anneal"
    warmup: float = 0.0
    # run
    out: str = "runs/gpt"
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    bf16: bool = True                # autocast on GPU

    @staticmethod
    def from_dict(d: dict) -> GPTConfig:
        return _from_dict(GPTConfig, d)


def _tiny() -> GPTConfig:
    """About 1M parameters besides the token embedding and head (5.2M in all at 16,384 codes); the
    default codes' 2000 steps took 47 min on one contended core (docs/generation)."""
    return GPTConfig(preset="tiny", model=GPTModelConfig(dim=128, n_layer=4, n_head=4), lr=1e-3, warmup=0.05,
                     schedule="cosine")


def _sized(name: str, dim: int, n_layer: int, n_head: int):
    return lambda: GPTConfig(preset=name, model=GPTModelConfig(dim=dim, n_layer=n_layer, n_head=n_head),
                             steps=300_000, batch_size=256, log_every=100, ckpt_every=5000)


GPT_PRESETS = {"tiny": _tiny, "B": _sized("B", 768, 12, 12), "L": _sized("L", 1024, 24, 16),
               "XL": _sized("XL", 1280, 36, 20)}


def gpt_preset(name: str) -> GPTConfig:
    if name not in GPT_PRESETS:
        raise ValueError(f"unknown generator preset {name!r}: expected one of {list(GPT_PRESETS)}")
    return GPT_PRESETS[name]()
