"""The generator's two ONNX graphs for the engine bundle: prefill and one decode step, with the
KV cache as explicit inputs and outputs (the runtime owns the cache and writes each new position).

    prefill: labels (R,) int64 -> logits (R, V), k (L, R, H, 1, hd), v (L, R, H, 1, hd)
    decode:  token (R,) int64, pos (1,) int64, k_cache_0 .. k_cache_{L-1}, v_cache_0 .. v_cache_{L-1}
             (R, H, T, hd) each -> logits (R, V), k (L, R, H, 1, hd), v (L, R, H, 1, hd)

R (rows, twice the images when CFG doubles the batch) is dynamic; T = h * w is fixed. The cache goes
in one input per layer, so that ONNX Runtime reads the caller's buffers in place (one (L, R, H, T,
hd) input would be split, that is copied, every step). See fullvq.models.gpt for the sequence
layout and the cache contract.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fullvq_rt.bundle import GeneratorSpec

from . import checkpoint
from .export import OPSET, PARITY_ATOL, ExportError

PREFILL_IO = (["labels"], ["logits", "k", "v"])
DECODE_OUTPUTS = ["logits", "k", "v"]


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

    def forward(self, token: torch.Tensor, pos: torch.Tensor, *caches: torch.Tensor):
        """caches: the L layers of k_cache, then the L layers of v_cache."""
        layers = self.model.n_layer
        return self.model.decode(token, pos, caches[:layers], caches[layers:])


ROWS = torch.export.Dim("rows", min=1, max=4096)


def _onnx(module: nn.Module, example: tuple, names: tuple[list[str], list[str]], dynamic_shapes: tuple) -> bytes:
    """ONNX bytes of `module` with the ROWS axes of `dynamic_shapes` dynamic, checked by onnx.checker."""
    import onnx

    program = torch.onnx.export(module, example, input_names=names[0], output_names=names[1], opset_version=OPSET,
                                dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
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


def export_generator(ckpt: str | Path, vocab_size: int,
                     grid: tuple[int, int] | None) -> tuple[dict[str, bytes], dict, dict]:
    """(members, manifest section, parity) of a generator checkpoint, checked against the tokenizer's
    vocabulary and its grid (None: a tokenizer that takes any size, e.g. codes extracted at 512 px by a
    256 px tokenizer). A generator trained on another tokenizer's codes is refused."""
    model, cfg = checkpoint.load_gpt(ckpt)
    model = model.float().eval()
    if cfg.vocab_size != vocab_size or grid not in (None, tuple(cfg.grid)):
        fixed = f" in a fixed {tuple(grid)} grid" if grid else ""
        made_by = cfg.tokenizer or "see the codes folder meta.json"
        raise ExportError(f"{ckpt}: the generator was trained on {cfg.vocab_size} codes in a {tuple(cfg.grid)} grid, "
                          f"the tokenizer has {vocab_size} codes{fixed}: export the tokenizer that made its codes "
                          f"({made_by})")
    grid = tuple(cfg.grid)
    m = cfg.model
    spec = GeneratorSpec(vocab_size, tuple(grid), cfg.num_classes, cfg.num_classes, m.n_layer, m.n_head,
                         m.dim // m.n_head, grid[0] * grid[1])
    rows = 3
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(cfg.num_classes + 1, (rows,), generator=g)
    cache = torch.randn(2 * spec.layers, rows, spec.heads, spec.seq_len, spec.head_dim, generator=g)
    decode_example = (torch.randint(vocab_size, (rows,), generator=g), torch.tensor([min(2, spec.seq_len - 1)]),
                      *cache.unbind())
    members, parity = {}, {}
    rows = {0: ROWS}
    for name, module, example, io, dynamic in (
            ("prefill", PrefillGraph(model), (labels,), PREFILL_IO, (rows,)),
            ("decode", DecodeGraph(model), decode_example, (spec.decode_inputs, DECODE_OUTPUTS),
             (rows, None, (rows,) * 2 * spec.layers))):  # the caches arrive as one *args tuple
        graph = _onnx(module.eval(), example, io, dynamic)
        parity[f"generator/{name}"] = _parity(name, module, graph, example, io[0])
        members[f"generator/{name}.onnx"] = graph
    section = {**asdict(spec), "grid": list(grid), "preset": cfg.preset, "checkpoint": str(ckpt)}
    return members, section, parity
