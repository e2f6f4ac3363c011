"""Image inputs and outputs of the Tokenizer: PIL images, HxWx3 uint8 arrays, paths, or lists of them."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def as_uint8_images(images: Any) -> tuple[list[np.ndarray], bool]:
    """([(H, W, 3) uint8, ...], whether a single image was given). A (B, H, W, 3) uint8 array is a
    batch; a list may mix PIL images, arrays and paths, of any sizes."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = [images[i] for i in range(len(images))]
        single = False
    elif isinstance(images, (list, tuple)):
        batch, single = list(images), False
    else:
        batch, single = [images], True
    if not batch:
        raise ValueError("no images given: pass an image, a path, a (B, H, W, 3) uint8 array or a non-empty list")
    return [_one(image, i) for i, image in enumerate(batch)], single


def _one(image: Any, position: int) -> np.ndarray:
    where = f"image {position}"
    if isinstance(image, (str, os.PathLike)):
        where, image = f"{os.fspath(image)!r}", _open(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image; any mode becomes RGB
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{where}: expected a PIL image, an HxWx3 uint8 array or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: arrays must be uint8 (0..255), got {image.dtype}: convert float images with "
                         f"(x * 255).round().clip(0, 255).astype(np.uint8)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: arrays must be HxWx3 (RGB), got shape {image.shape}")
    if 0 in image.shape:
        raise ValueError(f"{where}: the image is empty (shape {image.shape})")
    return image


def fit_sides(image: np.ndarray, f: int, position: int, pad: bool) -> np.ndarray:
    """`image` (H, W, 3) whose sides are multiples of f: as it is, or with pad=True reflected across its
    bottom and right edges up to the next multiples (the top-left pixel stays at token (0, 0));
    otherwise ValueError naming the nearest valid sizes."""
    h, w = image.shape[:2]
    if h % f == 0 and w % f == 0:
        return image
    if not pad:
        up = f"{h + (-h % f)}x{w + (-w % f)}"
        down = f"{h - h % f}x{w - w % f} (crop) and " if h >= f and w >= f else ""
        raise ValueError(f"image {position} is {h}x{w} (HxW): this tokenizer takes sides that are multiples of "
                         f"{f} (its downsampling factor); the nearest valid sizes are {down}{up}; crop or resize "
                         f"it, or pass pad=True to pad it to {up} (decode(..., crop_to=({h}, {w})) undoes that)")
    return np.pad(image, ((0, -h % f), (0, -w % f), (0, 0)), mode="reflect")


def _open(path: str | os.PathLike) -> Any:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ValueError("reading image files needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {os.fspath(path)!r} ({e.__class__.__name__}: {e})") from None


def to_network(batch: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1)


def from_network(x: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (clamped, rounded)."""
    return np.clip(np.rint((x.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(np.uint8)
