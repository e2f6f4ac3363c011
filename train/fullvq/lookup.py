"""The detached nearest-code argmin used by every quantizer.

CPU: fullvq_rt's native lookup (exact, no M x K matrix) on torch's thread count. CUDA: fullvq_rt's fused
kernel when the extension was built with CUDA, else torch in row chunks. Always fp32.
"""

from __future__ import annotations

import fullvq_rt
import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 26  # rows x codes per torch chunk (256 MB of fp32 distances)


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """z (M, D), codebook (K, D) -> (M,) int64 index of the nearest code (ties: lowest index)."""
    z, codebook = z.detach().float(), codebook.detach().float()
    if z.device.type == "cpu":
        indices = fullvq_rt.nearest(z.numpy(), codebook.numpy(), metric, num_threads=torch.get_num_threads())
        return torch.from_numpy(indices.astype(np.int64))
    if z.is_cuda and fullvq_rt.cuda_available():
        return torch.from_dlpack(fullvq_rt.nearest(z.contiguous(), codebook.contiguous(), metric)).long()
    return chunked_argmin(z, codebook, metric)


@torch.no_grad()
def chunked_argmin(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
                   chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """torch fallback of nearest_codes: (M, D), (K, D) -> (M,) int64, rows in chunks."""
    if metric == "cosine":
        z = torch.nn.functional.normalize(z, dim=1)
        codebook = torch.nn.functional.normalize(codebook, dim=1)
        bias = torch.zeros(len(codebook), device=z.device)
    elif metric == "l2":
        bias = (codebook * codebook).sum(1)
    else:
        raise ValueError(f"unknown metric {metric!r}: expected 'l2' or 'cosine'")
    rows = max(1, chunk_elements // max(1, len(codebook)))
    out = torch.empty(len(z), dtype=torch.long, device=z.device)
    for start in range(0, len(z), rows):
        scores = torch.addmm(bias, z[start:start + rows], codebook.T, alpha=-2.0 if metric == "l2" else -1.0)
        out[start:start + rows] = scores.argmin(1)
    return out
