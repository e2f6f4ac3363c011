"""Tokenizer: images <-> token grids through an fvq.engine bundle, without torch."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from . import _core
from .backends import open_backend
from .bundle import Bundle, describe, read_bundle
from .images import as_uint8_images, fit_sides, from_network, to_network
from .lookup import Codebook


class Tokenizer:
    """An image tokenizer loaded from an fvq.engine bundle (python export/to_trt.py ckpt.pt).

        tok = Tokenizer("fvq.engine")          # device="auto"|"cpu"|"cuda[:N]", backend="auto"|"onnxruntime"|"tensorrt"
        ids = tok.encode(img)                  # (H/f, W/f) int32; a (B, H, W, 3) batch or same-size list -> (B, h, w)
        ids = tok.encode(img, pad=True)        # any H, W: reflected up to multiples of f (tok.downsample)
        img = tok.decode(ids)                  # (h*f, w*f, 3) uint8; (B, h, w) -> (B, h*f, w*f, 3)
        img = tok.decode(ids, crop_to=(H, W))  # undoes pad=True

    Inputs: PIL images (any mode, converted to RGB), HxWx3 uint8 arrays, paths, a list mixing them,
    or a (B, H, W, 3) uint8 array. Sides must be multiples of f, or pad=True; nothing is resized
    silently. A list of images of different sizes gives a list of grids (images of one size run as
    one batch). A bundle whose graphs are fixed to one size (`fixed_size_reason` says why) takes only
    `image_size`. The nearest-code lookup (the bundle's metric) and the codebook gather run in
    fullvq_rt's C++ core.
    """

    def __init__(self, path: str | os.PathLike | Bundle, device: str = "auto", backend: str = "auto",
                 num_threads: int | None = None):
        self.bundle = path if isinstance(path, Bundle) else read_bundle(path)
        self._backend = open_backend(self.bundle, device, backend, num_threads)
        self._codebook = Codebook(self.bundle.codebook, self.bundle.metric)
        self._threads = num_threads

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the tokenizer was trained (and exported) at."""
        return self.bundle.image_size

    @property
    def downsample(self) -> int:
        """f: one token per f x f pixels."""
        return self.bundle.downsample

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the token grid of one `image_size` image."""
        return self.bundle.grid

    @property
    def dynamic_size(self) -> bool:
        """Whether images of other sizes than `image_size` are taken (else `fixed_size_reason` says why)."""
        return self.bundle.dynamic_size

    @property
    def fixed_size_reason(self) -> str:
        return self.bundle.fixed_size_reason

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

    def encode(self, images: Any, pad: bool = False) -> np.ndarray | list[np.ndarray]:
        """Image(s) -> token ids: (h, w) int32 for one image, (B, h, w) for a batch or a list of one
        size, a list of (h_i, w_i) grids for a list of several sizes."""
        arrays, single = as_uint8_images(images)
        grids = _by_shape([self._fit(image, i, pad) for i, image in enumerate(arrays)], self._encode_batch)
        if single:
            return grids[0]
        return np.stack(grids) if len({g.shape for g in grids}) == 1 else grids

    def _fit(self, image: np.ndarray, position: int, pad: bool) -> np.ndarray:
        if self.dynamic_size:
            return fit_sides(image, self.downsample, position, pad)
        if image.shape[:2] != self.image_size:
            (h, w), (eh, ew) = image.shape[:2], self.image_size
            raise ValueError(f"image {position} is {h}x{w} (HxW), this tokenizer takes only {eh}x{ew} "
                             f"({self.fixed_size_reason}): resize or crop it first (e.g. PIL's "
                             f"ImageOps.fit(img, ({ew}, {eh})))")
        return image

    def _encode_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, H/f, W/f) int32."""
        latents = self._backend.encode(to_network(batch))  # (B, D, h, w)
        b, d, h, w = latents.shape
        rows = np.ascontiguousarray(latents.transpose(0, 2, 3, 1)).reshape(-1, d)
        return self._codebook.nearest(rows, num_threads=self._threads).reshape(b, h, w)

    def decode(self, ids: Any, crop_to: Any = None) -> np.ndarray | list[np.ndarray]:
        """Token ids, integers in [0, K): an (h, w) grid -> (h*f, w*f, 3) uint8, (B, h, w) -> (B, h*f,
        w*f, 3), a list of grids -> a list of images. crop_to=(H, W) (or one pair per grid of a list)
        keeps the top-left H x W pixels: the size given to encode(..., pad=True)."""
        if isinstance(ids, (list, tuple)) and ids and all(np.ndim(g) == 2 for g in ids):
            crops = list(crop_to) if crop_to is not None and np.ndim(crop_to) == 2 else [crop_to] * len(ids)
            if len(crops) != len(ids):
                raise ValueError(f"crop_to has {len(crops)} sizes for {len(ids)} grids: give one (H, W) per grid")
            grids = [self._checked_ids(grid) for grid in ids]
            sizes = [self._crop_size(crop, grid.shape) if crop is not None else (None, None)
                     for grid, crop in zip(grids, crops, strict=True)]
            images = _by_shape(grids, self._decode_batch)
            return [image[:h, :w] for image, (h, w) in zip(images, sizes, strict=True)]
        array = self._checked_ids(ids)
        single = array.ndim == 2
        batch = array[None] if single else array
        h, w = self._crop_size(crop_to, batch.shape[1:]) if crop_to is not None else (None, None)
        images = self._decode_batch(batch)[:, :h, :w]
        return images[0] if single else images

    def _checked_ids(self, ids: Any) -> np.ndarray:
        """ids as an int64 (h, w) or (B, h, w) array of a size this bundle decodes (ValueError if not)."""
        array = np.asarray(ids)
        if array.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {array.dtype}")
        if array.ndim not in (2, 3) or 0 in array.shape:
            raise ValueError(f"token ids must be an (h, w) grid, a (B, h, w) batch or a list of grids, got shape "
                             f"{array.shape}")
        if not self.dynamic_size and array.shape[-2:] != self.grid:
            raise ValueError(f"token ids must have shape {self.grid} or (B, {self.grid[0]}, {self.grid[1]}), got "
                             f"{array.shape}: this bundle takes only its export size ({self.fixed_size_reason})")
        return np.ascontiguousarray(array, dtype=np.int64)

    def _decode_batch(self, ids: np.ndarray) -> np.ndarray:
        """(B, h, w) int64 -> (B, h*f, w*f, 3) uint8."""
        return from_network(self._backend.decode(_core.gather_nchw(self.codebook, ids)))

    def _crop_size(self, crop_to: Any, grid: tuple[int, ...]) -> tuple[int, int]:
        """crop_to as (H, W), checked to be a size that pads up to `grid` (h, w)."""
        try:
            h, w = (int(v) for v in crop_to)
        except (TypeError, ValueError):
            raise ValueError(f"crop_to must be a pair (H, W), got {crop_to!r}") from None
        f = self.downsample
        if not all((n - 1) * f < side <= n * f for side, n in zip((h, w), grid, strict=True)):
            raise ValueError(f"crop_to=({h}, {w}) does not fit a {grid[0]}x{grid[1]} token grid: H must be in "
                             f"{(grid[0] - 1) * f + 1}..{grid[0] * f} and W in {(grid[1] - 1) * f + 1}.."
                             f"{grid[1] * f} (the size the image had before encode(..., pad=True))")
        return h, w

    def __repr__(self) -> str:
        return f"Tokenizer({describe(self.bundle)}; backend {self.backend} on {self.device})"


def _by_shape(items: list[np.ndarray], run: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """run(stack of the items of one shape) once per shape; the results' rows back in the items' order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.shape, []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(items)
    for positions in groups.values():
        for i, result in zip(positions, run(np.stack([items[i] for i in positions])), strict=True):
            out[i] = result
    return out
