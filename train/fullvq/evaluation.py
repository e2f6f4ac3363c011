"""Tokenizer evaluation on image tensors: exact code usage and PSNR, summed across ranks."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .distributed import sum_across
from .metrics import CodeCounter, psnr


@torch.no_grad()
def usage_and_psnr(model, images: torch.Tensor, batch_size: int, device) -> dict:
    """This rank's images (N, 3, S, S) in [-1, 1] -> usage and PSNR over every rank's images."""
    quantizer = model.quantize
    counter = CodeCounter(quantizer.codebook_size, device)
    total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        recon, out = model(x)
        counter.add(out.indices)
        total += psnr(recon, x).double().sum()
        count += len(x)
    counter.reduce()
    total, count = sum_across(total), sum_across(count)
    return {"usage": counter.usage, "num_tokens": counter.num_tokens, "perplexity": counter.perplexity,
            "dead_codes": counter.dead_codes, "psnr": float(total / count.clamp_min(1))}


def save_grid(path, originals: torch.Tensor, recons: torch.Tensor, columns: int = 8) -> None:
    """PNG of image pairs: each row of originals (B, 3, S, S) in [-1, 1] above its reconstructions."""
    columns = min(columns, len(originals))
    pairs = []
    for i in range(0, len(originals), columns):
        pairs += [originals[i:i + columns], recons[i:i + columns]]
    rows = [torch.cat(list(r), 2) for r in pairs if len(r) == columns]
    grid = ((torch.cat(rows, 1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(np.ascontiguousarray(grid)).save(path)
