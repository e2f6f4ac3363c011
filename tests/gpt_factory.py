"""A tiny random generator checkpoint for tests (no training)."""

from dataclasses import asdict
from pathlib import Path

NUM_CLASSES = 3


def gpt_checkpoint(path: Path, vocab: int, grid: tuple[int, int], seed: int = 0) -> Path:
    """A tiny random generator whose head is scaled up so that its logits have clear maxima."""
    import torch

    from fullvq.checkpoint import save
    from fullvq.gpt_config import gpt_preset
    from fullvq.models import GPT

    cfg = gpt_preset("tiny")
    cfg.model.dim, cfg.model.n_layer, cfg.model.n_head = 32, 2, 2
    cfg.vocab_size, cfg.grid, cfg.num_classes = vocab, grid, NUM_CLASSES
    torch.manual_seed(seed)
    model = GPT(cfg.model, vocab, grid, NUM_CLASSES)
    with torch.no_grad():
        model.output.weight.normal_(0, 1.0)
    save(path, {"kind": "gpt", "config": asdict(cfg), "model": model.state_dict(), "step": 0})
    return path
