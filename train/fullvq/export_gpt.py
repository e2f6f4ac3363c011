"""The generator's two ONNX graphs for the engine bundle: prefill and one decode step, with the
KV cache as explicit inputs and outputs (the runtime owns the cache and writes each new position).

    prefill: labels (R,) int64 -> logits (R, V), k (L, R, H, 1, hd), v (L, R, H, 1, hd)
    decode:  token (R,) int64, pos (1,) int64, k_cache (L, R, H, T, hd), v_cache (L, R, H, T, hd)
             -> logits (R, V), k (L, R, H, 1, hd), v (L, R, H, 1, hd)

R (rows, twice the images when CFG doubles the batch) is dynamic; T = h * w is fixed. See
fullvq.models.gpt for the sequence layout and the cache contract.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint
from .export import OPSET, PARITY_ATOL, ExportError

PREFILL_IO = (["labels"], ["logits", "k", "v"])
DECODE_IO = (["token", "pos", "k_cache", "v_cache"], ["logits", "k", "v"])


class PrefillGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor):
        return self.model.prefill(labels)


class DecodeGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        return self.model.decode(token, pos, k_cache, v_cache)


def _onnx(module: nn.Module, example: tuple, names: tuple[list[str], list[str]], batch_axes: list[int | None]) -> bytes:
    """ONNX bytes of `module` with the rows axis of each input dynamic, checked by onnx.checker."""
    import onnx

    rows = torch.export.Dim("rows", min=1, max=4096)
    shapes = tuple({axis: rows} if axis is not None else None for axis in batch_axes)
    program = torch.onnx.export(module, example, input_names=names[0], output_names=names[1], opset_version=OPSET,
                                dynamo=True, dynamic_shapes=shapes, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _parity(name: str, module: nn.Module, graph: bytes, example: tuple, input_names: list[str]) -> float:
    """Max |ONNX Runtime - PyTorch| / max |PyTorch| over all outputs; ExportError above PARITY_ATOL."""
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(input_names, example)})
    with torch.no_grad():
        want = [t.numpy() for t in module(*example)]
    error = max(float(np.abs(g - w).max() / max(1e-6, np.abs(w).max())) for g, w in zip(got, want))
    if error > PARITY_ATOL:
        raise ExportError(f"generator/{name}.onnx differs from PyTorch by {error:.2e} (relative), over {PARITY_ATOL:.0e}")
    return error


def export_generator(ckpt: str | Path, vocab_size: int, grid: tuple[int, int]) -> tuple[dict[str, bytes], dict, dict]:
    """(members, manifest section, parity) of a generator checkpoint, checked against the tokenizer's
    vocabulary and grid (a generator trained on another tokenizer's codes is refused)."""
    model, cfg = checkpoint.load_gpt(ckpt)
    model = model.float().eval()
    if cfg.vocab_size != vocab_size or tuple(cfg.grid) != tuple(grid):
        raise ExportError(f"{ckpt}: the generator was trained on {cfg.vocab_size} codes in a {tuple(cfg.grid)} grid, "
                          f"the tokenizer has {vocab_size} codes in a {tuple(grid)} grid: export the tokenizer that "
                          f"made its codes ({cfg.tokenizer or 'see the codes folder meta.json'})")
    m = cfg.model
    layers, heads, head_dim, seq = m.n_layer, m.n_head, m.dim // m.n_head, grid[0] * grid[1]
    rows = 3
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(cfg.num_classes + 1, (rows,), generator=g)
    cache = torch.randn(2, layers, rows, heads, seq, head_dim, generator=g)
    decode_example = (torch.randint(vocab_size, (rows,), generator=g), torch.tensor([min(2, seq - 1)]), cache[0], cache[1])
    members, parity = {}, {}
    for name, module, example, io, axes in (
            ("prefill", PrefillGraph(model), (labels,), PREFILL_IO, [0]),
            ("decode", DecodeGraph(model), decode_example, DECODE_IO, [0, None, 1, 1])):
        graph = _onnx(module.eval(), example, io, axes)
        parity[f"generator/{name}"] = _parity(name, module, graph, example, io[0])
        members[f"generator/{name}.onnx"] = graph
    section = {"vocab_size": vocab_size, "grid": list(grid), "num_classes": cfg.num_classes,
               "null_class": cfg.num_classes, "layers": layers, "heads": heads, "head_dim": head_dim,
               "seq_len": seq, "preset": cfg.preset, "checkpoint": str(ckpt)}
    return members, section, parity
