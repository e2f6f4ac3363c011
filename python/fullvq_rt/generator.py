"""Generator: class-conditional images from an fvq.engine bundle that holds a generator, without torch."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _core
from .backends import parse_device
from .backends.ort import OnnxRuntimeGenerator
from .bundle import EngineError, read_bundle
from .sampling import checked_uint
from .tokenizer import Tokenizer


class Generator:
    """An autoregressive image generator loaded from an fvq.engine bundle
    (python export/to_trt.py TOKENIZER_CKPT --generator GPT_CKPT).

        gen = Generator("fvq.engine")                 # device="auto"|"cpu"|"cuda[:N]"
        images = gen.sample([3, 3, 7], cfg=4.0, top_k=1000, seed=0)   # (3, H, W, 3) uint8

    The networks (prefill and one decode step per token) run in ONNX Runtime; everything between
    them runs in fullvq_rt's C++ core: CFG combine, temperature, top-k and top-p filtering, the draw
    (a counter-based Philox RNG keyed by `seed` and the token index), feeding the token back and the
    KV-cache writes. Same seed, same device and threads: same images.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", backend: str = "auto",
                 num_threads: int | None = None):
        bundle = read_bundle(path)
        if bundle.generator is None:
            raise EngineError(f"{bundle.path}: this bundle has no generator; export one with "
                              f"`python export/to_trt.py TOKENIZER_CKPT --generator GPT_CKPT`")
        self.spec = bundle.generator
        self.tokenizer = Tokenizer(bundle, device, backend, num_threads)
        kind, index = parse_device(device)
        self._net = OnnxRuntimeGenerator(bundle, kind, index, num_threads)
        self._threads = num_threads or 0

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w): the token grid the generator was trained on, and samples."""
        return self.spec.grid

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images it samples: its grid times the tokenizer's downsampling factor."""
        return self.spec.grid[0] * self.tokenizer.downsample, self.spec.grid[1] * self.tokenizer.downsample

    def sample(self, class_ids: Any, cfg: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None) -> np.ndarray:
        """Class ids (B,) -> (B, H, W, 3) uint8 images (a single int gives one (H, W, 3) image).
        cfg >= 0 (1.0: no guidance; otherwise the batch is doubled with the null class), temperature
        > 0, top_k >= 0 (0: off), top_p in (0, 1] (1: off); seed None draws a fresh one."""
        tokens = self.sample_tokens(class_ids, cfg, temperature, top_k, top_p, seed)
        return self.tokenizer.decode(tokens)

    def sample_tokens(self, class_ids: Any, cfg: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int | None = None) -> np.ndarray:
        """As `sample`, but returns the token grids: (B, h, w) int32 (or (h, w) for a single int)."""
        labels, single = self._labels(class_ids)
        seed = int.from_bytes(os.urandom(8), "little") if seed is None else checked_uint(seed, "seed")
        s = self.spec
        loop = _core.SamplingLoop(len(labels), s.layers, s.heads, s.seq_len, s.head_dim, s.vocab_size, float(cfg),
                                  float(temperature), int(top_k), float(top_p), int(seed), self._threads)
        rows = np.concatenate([labels, np.full_like(labels, s.null_class)]) if loop.guided else labels
        logits, k, v = self._net.prefill(rows)
        for pos in range(s.seq_len):
            token = loop.step(logits, k, v)  # writes k/v at `pos`, draws token `pos`, returns it for every row
            if pos + 1 < s.seq_len:
                logits, k, v = self._net.decode(token, pos + 1, loop.k_cache, loop.v_cache)
        grids = loop.tokens().reshape(len(labels), *s.grid)
        return grids[0] if single else grids

    def _labels(self, class_ids: Any) -> tuple[np.ndarray, bool]:
        single = np.ndim(class_ids) == 0
        labels = np.atleast_1d(np.asarray(class_ids))
        if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu":
            raise ValueError(f"class_ids must be an int or a non-empty 1-D sequence of ints, got {class_ids!r}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise ValueError(f"unknown class {int(bad[0])}: this generator has classes 0..{self.num_classes - 1}")
        return labels.astype(np.int64), single

    def __repr__(self) -> str:
        s = self.spec
        return (f"Generator({s.num_classes} classes, {s.grid[0]}x{s.grid[1]} tokens of {s.vocab_size}, "
                f"{s.layers} layers; {self.tokenizer!r})")
