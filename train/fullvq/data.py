"""Training and evaluation images: a folder of images, or the real photos that ship in pip packages.

Two ways to cut training crops (Config.train_crops):
- "split" (TrainCrops): every image is split once; its left three quarters feed random crops, its
  right quarter is cut into non-overlapping held-out tiles (heldout_tiles).
- "resize" (ResizedCrops): LlamaGen's and FVQ's random_crop_arr of whole images, epoch by epoch
  (each image once per epoch, in a seeded order), with a horizontal flip; held-out images come from
  a separate folder (Config.val_data).
Either way a training crop is a pure function of (seed, sample index), so any number of loader
workers, any number of ranks and a resumed run all see the same crops.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

TRAIN_CROPS = ("split", "resize")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
HELDOUT_FRACTION = 0.25
MAX_HELDOUT_IMAGES = 256
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                   "rocket", "stereo_motorcycle")
DEFAULT_PHOTO_NAMES = (*_SKIMAGE_PHOTOS, "china", "flower", "grace_hopper")  # of default_photos(), in order


def default_photos() -> list[Image.Image]:
    """The RGB photos that ship inside scikit-image, scikit-learn and matplotlib (11, offline)."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in _SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        photos.append(Image.fromarray(array[0] if isinstance(array, tuple) else array))
    photos += [Image.fromarray(a) for a in load_sample_images().images]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(Image.open(f).convert("RGB"))
    return photos


def list_images(folder: str | Path) -> list[Path]:
    """Image files below `folder` (recursive, sorted); a clear error when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist: pass --data DIR with a folder of images, "
                                f"or leave --data out to use the photos that ship with scikit-image")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found below {str(root)!r}")
    return files


def open_rgb(source: Image.Image | Path) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {str(source)!r} ({e}): remove or replace the file") from None


def split(image: Image.Image, size: int) -> tuple[Image.Image, Image.Image]:
    """(training region, held-out region): left 3/4 and right 1/4, each at least `size` tall/wide."""
    w, h = image.size
    cut = int(round(w * (1 - HELDOUT_FRACTION)))
    return _at_least(image.crop((0, 0, cut, h)), size), _at_least(image.crop((cut, 0, w, h)), size)


def _at_least(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) >= size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class TrainCrops(Dataset):
    """Item i = random crop (3, S, S) in [-1, 1] of a random image's training region, seeded by i."""

    def __init__(self, sources: list, size: int, seed: int):
        self.sources, self.size, self.seed = sources, size, seed
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return 2**62

    def region(self, k: int) -> Image.Image:
        if k in self._cache:
            return self._cache[k]
        region = split(open_rgb(self.sources[k]), self.size)[0]
        if isinstance(self.sources[k], Image.Image) or len(self._cache) < 64:
            self._cache[k] = region
        return region

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        k = int(torch.randint(len(self.sources), (1,), generator=g))
        region = self.region(k)
        w, h = region.size
        x = int(torch.randint(w - self.size + 1, (1,), generator=g))
        y = int(torch.randint(h - self.size + 1, (1,), generator=g))
        crop = to_tensor(region.crop((x, y, x + self.size, y + self.size)))
        return crop.flip(2) if bool(torch.rand(1, generator=g) < 0.5) else crop


class ResizedCrops(Dataset):
    """Item i = LlamaGen/FVQ's random_crop_arr (3, S, S) in [-1, 1] of image perm_e[i % N], flipped with
    probability 1/2, where e = i // N is the epoch and perm_e a permutation of the N images seeded by
    (seed, e): each image once per epoch, a new order and new crops every epoch."""

    def __init__(self, sources: list, size: int, seed: int):
        self.sources, self.size, self.seed = sources, size, seed
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation), one at a time

    def __len__(self) -> int:
        return 2**62

    def image_of(self, i: int) -> int:
        epoch, n = divmod(i, len(self.sources))
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(-(self.seed * 1_000_003 + epoch + 1))  # apart from the crops' seeds
            self._order = epoch, torch.randperm(len(self.sources), generator=g)
        return int(self._order[1][n])

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        crop = to_tensor(random_crop_arr(open_rgb(self.sources[self.image_of(i)]), self.size, g))
        return crop.flip(2) if bool(torch.rand(1, generator=g) < 0.5) else crop


def random_crop_arr(image: Image.Image, size: int, g: torch.Generator, min_crop_frac: float = 0.8) -> Image.Image:
    """ADM's random_crop_arr as LlamaGen and FVQ train with it (dataset/augmentation.py), drawing from `g`:
    the short side goes to a random length in [S, ceil(S / min_crop_frac)] (halvings with a box filter
    while the image is at least twice that, then bicubic), then a random S x S crop."""
    short = int(torch.randint(size, math.ceil(size / min_crop_frac) + 1, (1,), generator=g))
    while min(image.size) >= 2 * short:
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    scale = short / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    top = int(torch.randint(image.height - size + 1, (1,), generator=g))
    left = int(torch.randint(image.width - size + 1, (1,), generator=g))
    return image.crop((left, top, left + size, top + size))


def tiles(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (N, 3, S, S): the non-overlapping S x S tiles, row by row (the remainder is dropped)."""
    _, h, w = image.shape
    t = image[:, : h - h % size, : w - w % size].unfold(1, size, size).unfold(2, size, size)
    return t.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (1, 3, S, S), the central S x S square (no resizing)."""
    _, h, w = image.shape
    top, left = (h - size) // 2, (w - size) // 2
    return image[None, :, top:top + size, left:left + size]


def heldout_tiles(sources: list, size: int) -> torch.Tensor:
    """(N, 3, S, S) non-overlapping tiles of the held-out regions (of up to 256 images)."""
    step = max(1, len(sources) // MAX_HELDOUT_IMAGES)
    return torch.cat([tiles(to_tensor(split(open_rgb(source), size)[1]), size)
                      for source in sources[::step][:MAX_HELDOUT_IMAGES]])


@dataclass
class Skipped:
    """What a pass over a folder left out or changed, by file name."""

    unreadable: dict[str, str] = field(default_factory=dict)  # file -> reason
    too_small: list[str] = field(default_factory=list)
    converted: dict[str, str] = field(default_factory=dict)   # file -> original mode, e.g. "L", "RGBA"
    upscaled: list[str] = field(default_factory=list)         # crop "resize": short side below S, enlarged


def short_side_crop(image: Image.Image, size: int) -> Image.Image:
    """The S x S centre of `image` after scaling its short side to S: halvings with a box filter while
    the short side is at least 2S, then one bicubic resize (up or down); the crop starts at
    ((W' - S) // 2, (H' - S) // 2). ADM's center_crop_arr, which LlamaGen and FVQ extract codes and
    evaluate with."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def folder_images(files: list[Path], size: int, crop: str, skipped: Skipped) -> Iterator[torch.Tensor]:
    """Per readable file, (N, 3, S, S) in [-1, 1]: its tiles (crop="tiles"), its center crop (crop="center"),
    or short_side_crop (crop="resize", as LlamaGen makes generator training data).

    Unreadable files, and for tiles and center crops files smaller than S on a side, are recorded in
    `skipped`, never raised; crop="resize" enlarges those and records them in skipped.upscaled; other
    modes (grayscale, RGBA, palette) are converted to RGB (alpha dropped) and recorded."""
    if crop not in ("tiles", "center", "resize"):
        raise ValueError(f"unknown crop {crop!r}: expected 'tiles', 'center' or 'resize'")
    for path in files:
        try:
            with Image.open(path) as image:
                mode = image.mode
                rgb = image.convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            skipped.unreadable[str(path)] = f"{e.__class__.__name__}: {e}"
            continue
        if min(rgb.size) < size:
            if crop != "resize":
                skipped.too_small.append(str(path))
                continue
            skipped.upscaled.append(str(path))
        if mode != "RGB":
            skipped.converted[str(path)] = mode
        if crop == "resize":
            yield to_tensor(short_side_crop(rgb, size))[None]
        else:
            x = to_tensor(rgb)
            yield tiles(x, size) if crop == "tiles" else center_crop(x, size)


def load_sources(data: str) -> list:
    """PIL images (default photos) or file paths (a folder)."""
    return default_photos() if not data else list_images(data)


def training_crops(sources: list, size: int, seed: int, how: str) -> TrainCrops | ResizedCrops:
    """The training crops of Config.train_crops `how` ("split" or "resize")."""
    if how not in TRAIN_CROPS:
        raise ValueError(f"unknown train_crops {how!r}: expected 'split' (left 3/4 of each image, the rest held "
                         f"out) or 'resize' (LlamaGen/FVQ's random_crop_arr of whole images)")
    return (TrainCrops if how == "split" else ResizedCrops)(sources, size, seed)


def train_batches(dataset: Dataset, batch_size: int, start_step: int, rank: int = 0, world: int = 1,
                  num_workers: int = 0, pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Endless (B, 3, S, S) batches for this rank, from step `start_step` on: sample indices
    (step * world + rank) * B ... + B - 1, decoded by `num_workers` worker processes."""

    def indices():
        step = start_step
        while True:
            base = (step * world + rank) * batch_size
            yield from range(base, base + batch_size)
            step += 1

    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices(), num_workers=num_workers,
                        persistent_workers=num_workers > 0, pin_memory=pin_memory)
    return iter(loader)
