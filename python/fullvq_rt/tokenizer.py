"""Tokenizer: images <-> token grids through an fvq.engine bundle, without torch."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _core
from .backends import open_backend
from .bundle import Bundle, describe, read_bundle
from .images import as_uint8_batch, from_network, to_network
from .lookup import Codebook


class Tokenizer:
    """An image tokenizer loaded from an fvq.engine bundle (python export/to_trt.py ckpt.pt).

        tok = Tokenizer("fvq.engine")          # device="auto"|"cpu"|"cuda[:N]", backend="auto"|"onnxruntime"|"tensorrt"
        ids = tok.encode(img)                  # (h, w) int32; a list or (B, H, W, 3) batch -> (B, h, w)
        img = tok.decode(ids)                  # (H, W, 3) uint8; (B, h, w) -> (B, H, W, 3)

    Inputs: PIL images (any mode, converted to RGB), HxWx3 uint8 arrays, paths, a list mixing them,
    or a (B, H, W, 3) uint8 array. Every image must be exactly `image_size` (H, W): other sizes raise
    ValueError saying so (resize or crop first; nothing is resized silently). The nearest-code
    lookup (the bundle's metric) and the codebook gather run in fullvq_rt's C++ core.
    """

    def __init__(self, path: str | os.PathLike | Bundle, device: str = "auto", backend: str = "auto",
                 num_threads: int | None = None):
        self.bundle = path if isinstance(path, Bundle) else read_bundle(path)
        self._backend = open_backend(self.bundle, device, backend, num_threads)
        self._codebook = Codebook(self.bundle.codebook, self.bundle.metric)
        self._threads = num_threads

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images this tokenizer takes and returns."""
        return self.bundle.image_size

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the token grid of one image."""
        return self.bundle.grid

    @property
    def codebook(self) -> np.ndarray:
        """(K, D) float32, the baked codebook (read-only)."""
        return self.bundle.codebook

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def device(self) -> str:
        return self._backend.device

    def encode(self, images: Any) -> np.ndarray:
        """Image(s) -> token ids: (h, w) int32 for one image, (B, h, w) for a list or batch."""
        batch, single = as_uint8_batch(images, self.image_size)
        latents = self._backend.encode(to_network(batch))  # (B, D, h, w)
        b, d, h, w = latents.shape
        rows = np.ascontiguousarray(latents.transpose(0, 2, 3, 1)).reshape(-1, d)
        ids = self._codebook.nearest(rows, num_threads=self._threads).reshape(b, h, w)
        return ids[0] if single else ids

    def decode(self, ids: Any) -> np.ndarray:
        """Token ids (h, w) or (B, h, w), integers in [0, K) -> (H, W, 3) or (B, H, W, 3) uint8."""
        array = np.asarray(ids)
        if array.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {array.dtype}")
        if array.ndim not in (2, 3) or array.shape[-2:] != self.grid:
            raise ValueError(f"token ids must have shape {self.grid} or (B, {self.grid[0]}, {self.grid[1]}), "
                             f"got {array.shape}")
        single = array.ndim == 2
        array = np.ascontiguousarray(array[None] if single else array, dtype=np.int64)
        images = from_network(self._backend.decode(_core.gather_nchw(self.codebook, array)))
        return images[0] if single else images

    def __repr__(self) -> str:
        return f"Tokenizer({describe(self.bundle)}; backend {self.backend} on {self.device})"
