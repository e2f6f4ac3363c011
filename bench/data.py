"""Training-data throughput: images per second the loader delivers, side by side in one process.

    python bench/data.py [--data DIR] [--image-size 256] [--batch-size 32] [--batches 20] [--workers 0,1,2]

Without --data, an ImageNet-like folder is written first: 200 JPEGs (quality 90) of 500 x 375 and
375 x 500 px cut from the photos that ship in pip packages, in 4 class folders. Rows: fvq.py's
"resize" crops (LlamaGen/FVQ's random_crop_arr + flip of whole images, the fvq preset) with each
worker count, and the "split" crops of the tiny preset (left three quarters of each image) at the
same size as the baseline. Every row reads the same files from the same sample index on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fullvq.data import default_photos, list_images, train_batches, training_crops

sys.path.insert(0, str(Path(__file__).parent))
from lookup import cpu_model  # noqa: E402


def imagenet_like(folder: Path, count: int = 200, seed: int = 0) -> Path:
    """`count` JPEGs of ImageNet's typical sizes in 4 class folders, cut from the shipped photos."""
    rng = np.random.default_rng(seed)
    photos = default_photos()
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = (500, 375) if i % 3 else (375, 500)
        scale = max(w / photo.width, h / photo.height) * rng.uniform(1.0, 1.6)
        big = photo.resize((round(photo.width * scale), round(photo.height * scale)))
        x, y = rng.integers(0, big.width - w + 1), rng.integers(0, big.height - h + 1)
        target = folder / f"n{i % 4:08d}"
        target.mkdir(parents=True, exist_ok=True)
        big.crop((x, y, x + w, y + h)).save(target / f"{i:05d}.JPEG", quality=90)
    return folder


def images_per_second(files: list, crops: str, size: int, batch: int, batches: int, workers: int) -> float:
    """Batches delivered after the first (worker start-up), in images per second."""
    loader = train_batches(training_crops(files, size, 0, crops), batch, 0, num_workers=workers)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a folder of images (default: a generated ImageNet-like folder)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", default="0,1,2")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = list_images(args.data or imagenet_like(Path(tmp)))
        counts = [int(w) for w in args.workers.split(",")]
        rows = [("split (tiny preset)", "split", 0)] + [
            (f"resize (fvq preset), {w} worker{'' if w == 1 else 's'}", "resize", w) for w in counts]
        rates = {label: images_per_second(files, crops, args.image_size, args.batch_size, args.batches, workers)
                 for label, crops, workers in rows}
    base = rates[rows[0][0]]
    print(f"# Training crops of {args.image_size} px, batch {args.batch_size}, {len(files)} files "
          f"({args.data or 'generated ImageNet-like JPEGs'}), {os.cpu_count()} CPU cores, {cpu_model()}\n")
    print("| loader | images/s | vs split |")
    print("|---|---:|---:|")
    for label, rate in rates.items():
        print(f"| {label} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
