"""The codes folder: a tokenizer's token grids of a labelled image set, the generator's training data.

    CODES/codes.npy    (N, T) int32, each row a token grid (h, w) flattened row-major, T = h * w;
                       with flips, rows 2i and 2i + 1 are image i and its horizontal mirror
    CODES/labels.npy   (N,) int64 class index of each row
    CODES/meta.json    {"format": "fullvq-codes", "version": 1, "vocab_size", "grid": [h, w], "num_classes",
                        "class_names", "image_size" (of the encoded images; grid = image_size / f),
                        "tokenizer_image_size" (the size the tokenizer was trained at; optional), "flip",
                        "tokenizer" (absolute checkpoint path), "num_images", "skipped" ({file: reason})}

Written by train/extract_codes.py (`extract` + `write_codes`), read by `read_codes` and `CodesDataset`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from .config import Config
from .data import DEFAULT_PHOTO_NAMES, Skipped, default_photos, folder_images, list_images, split, tiles, to_tensor

FORMAT = "fullvq-codes"
VERSION = 1
MEMBERS = ("codes.npy", "labels.npy", "meta.json")
HOLDOUT_EVERY = 20  # images 0, 20, 40, ... (with their flips) are held out of generator training


def labelled_sources(data: str) -> tuple[list, list[int], list[str]]:
    """(sources, label of each source, class names).

    data = "": the default photos, one class each (sources are PIL images, cut into tiles later);
    else ImageNet-style class folders DIR/<class>/... (sources are image files, found recursively;
    label = index of the class folder in sorted order)."""
    if not data:
        photos = default_photos()
        return photos, list(range(len(photos))), list(DEFAULT_PHOTO_NAMES)
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist: pass --data DIR with one folder of "
                                f"images per class, or leave --data out to use the photos that ship in pip packages")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {str(root)!r}: expected DIR/<class>/<images> (the ImageNet layout)")
    sources, labels = [], []
    for label, folder in enumerate(classes):
        files = list_images(folder)
        sources += files
        labels += [label] * len(files)
    return sources, labels, [p.name for p in classes]


def source_images(source: Image.Image | Path, size: int, skipped: Skipped) -> torch.Tensor | None:
    """(n, 3, S, S) in [-1, 1]: a default photo's training-region tiles (fullvq.data.split), or a file's
    center crop after resizing its short side to S; None for a file recorded in `skipped`."""
    if isinstance(source, Image.Image):
        return tiles(to_tensor(split(source.convert("RGB"), size)[0]), size)
    return next(folder_images([source], size, "resize", skipped), None)


def token_grid(cfg: Config, size: int) -> tuple[int, int]:
    """(h, w) token grid of the tokenizer `cfg` on S x S images; a ValueError when it has none."""
    if cfg.quantizer.residual_depth > 1:
        raise ValueError(f"the tokenizer is residual VQ (quantizer.residual_depth={cfg.quantizer.residual_depth}): "
                         f"it gives several codes per cell, the generator models one; use a single-stage tokenizer")
    factor = 2 ** (len(cfg.model.ch_mult) - 1)
    if size % factor:
        raise ValueError(f"image size {size} is not a multiple of the tokenizer's downsampling factor {factor}")
    return size // factor, size // factor


@torch.no_grad()
def encode_grids(model, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """x (n, 3, S, S) -> (n, 1 + flip, T) int32 token grids of each image (and of its mirror), row-major."""
    batch = torch.cat([x, x.flip(3)]) if flip else x
    return model.encode(batch).indices.reshape(1 + flip, len(x), -1).transpose(0, 1).to(torch.int32).cpu()


def extract(model, sources: list, size: int, batch_size: int, device: torch.device, flip: bool = True,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray, Skipped] | None:
    """Encodes sources[rank::world] on this rank; on rank 0 returns every rank's results in source order:
    (grids (n, 1 + flip, T) int32, source index of each image (n,), what was skipped); None elsewhere."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    skipped, owners, grids, pending = Skipped(), [], [], []

    def flush(count: int) -> None:
        nonlocal pending
        batch = torch.cat(pending)
        grids.append(encode_grids(model, batch[:count].to(device), flip))
        pending = [batch[count:]]

    mine = range(rank, len(sources), world)
    for i in tqdm(mine, desc="encode", unit="source", disable=not progress, dynamic_ncols=True, mininterval=1.0):
        x = source_images(sources[i], size, skipped)
        if x is None:
            continue
        owners += [i] * len(x)
        pending.append(x)
        while sum(map(len, pending)) >= batch_size:
            flush(batch_size)
    if sum(map(len, pending)):
        flush(sum(map(len, pending)))
    part = (np.asarray(owners, dtype=np.int64), torch.cat(grids).numpy() if grids else None, skipped)
    parts = [part]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
    if rank != 0:
        return None
    owners = np.concatenate([p[0] for p in parts])
    found = [p[1] for p in parts if p[1] is not None]
    if not found:
        raise ValueError(f"no image could be encoded: all {len(sources)} files were unreadable or smaller than "
                         f"{size} px")
    order = np.argsort(owners, kind="stable")  # each source's images come from one rank, in order
    merged = Skipped()
    for p in parts:
        merged.unreadable.update(p[2].unreadable)
        merged.too_small += p[2].too_small
        merged.converted.update(p[2].converted)
        merged.upscaled += p[2].upscaled
    return np.concatenate(found)[order], owners[order], merged


def write_codes(out: str | Path, codes: np.ndarray, labels: np.ndarray, meta: dict) -> None:
    """Writes a codes folder: every member into a temporary folder beside `out`, then one rename (an
    existing codes folder at `out` is replaced; any other existing folder is refused)."""
    out = Path(out)
    check_writable(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed writer
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "codes.npy", np.ascontiguousarray(codes, dtype=np.int32))
        np.save(tmp / "labels.npy", np.ascontiguousarray(labels, dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=1))
        if out.exists():
            old = out.with_name(tmp.name.removesuffix(".tmp") + ".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(out: str | Path) -> None:
    """Refuses an `out` that exists and is neither empty nor a codes folder (writing replaces the folder)."""
    out = Path(out)
    if not out.exists() or out.is_dir() and not any(out.iterdir()):
        return
    try:
        if json.loads((out / "meta.json").read_text()).get("format") == FORMAT:
            return
    except (OSError, ValueError, AttributeError):
        pass
    raise ValueError(f"{str(out)!r} exists and is not a codes folder: choose another --out, or remove it")


def read_codes(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(codes (N, T) int32, memory-mapped; labels (N,) int64; meta) of a codes folder, after checking
    its format, version, shapes and value ranges."""
    path = Path(path)
    redo = f"re-extract it with `python train/extract_codes.py CKPT --out {path}`"
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no codes folder at {str(path)!r} (no meta.json): make one with "
                                f"`python train/extract_codes.py CKPT --out {path}`")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / 'meta.json'} is unreadable ({e}): {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / 'meta.json'} is not a fullvq codes folder's meta.json: {redo}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} is a version {meta.get('version')} codes folder; this fullvq reads version "
                         f"{VERSION}: {redo}")
    expected = {"vocab_size": int, "grid": list, "num_classes": int, "class_names": list, "image_size": int,
                "flip": bool, "tokenizer": str, "num_images": int, "skipped": dict}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path / 'meta.json'}: {key!r} is missing or not a {kind.__name__}: {redo}")
    arrays = {}
    for name in ("codes.npy", "labels.npy"):
        try:
            arrays[name] = np.load(path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path / name} is missing or unreadable ({e}): {redo}") from None
    codes, labels = arrays["codes.npy"], arrays["labels.npy"]
    h, w = meta["grid"]
    rows = meta["num_images"] * (2 if meta["flip"] else 1)
    problems = {
        "codes.npy": [codes.dtype == np.int32, codes.shape == (rows, h * w),
                      f"(num_images * {2 if meta['flip'] else 1}, h * w) = {(rows, h * w)} int32",
                      f"{codes.shape} {codes.dtype}"],
        "labels.npy": [labels.dtype == np.int64, labels.shape == (rows,), f"({rows},) int64",
                       f"{labels.shape} {labels.dtype}"],
    }
    for name, (dtype_ok, shape_ok, want, got) in problems.items():
        if not (dtype_ok and shape_ok):
            raise ValueError(f"{path / name} holds {got}, meta.json says {want}: {redo}")
    if len(meta["class_names"]) != meta["num_classes"]:
        raise ValueError(f"{path / 'meta.json'}: {len(meta['class_names'])} class_names for num_classes="
                         f"{meta['num_classes']}: {redo}")
    for name, values, bound, key in (("codes.npy", codes, meta["vocab_size"], "vocab_size"),
                                     ("labels.npy", labels, meta["num_classes"], "num_classes")):
        if rows and (values.min() < 0 or values.max() >= bound):
            raise ValueError(f"{path / name} holds values in [{values.min()}, {values.max()}], outside "
                             f"[0, {key}={bound}): {redo}")
    return codes, labels, meta


class CodesDataset:
    """A codes folder split once by image: every HOLDOUT_EVERY-th image (with its flip) is held out.

    Training batches are random training rows, a pure function of (seed, step, rank): a resumed run,
    and any number of restarts, see the same batches."""

    def __init__(self, path: str | Path):
        self.codes, self.labels, self.meta = read_codes(path)
        image = np.arange(len(self.codes)) // (2 if self.meta["flip"] else 1)
        held = image % HOLDOUT_EVERY == 0
        self.train_rows, self.heldout_rows = np.flatnonzero(~held), np.flatnonzero(held)
        if not len(self.train_rows):
            raise ValueError(f"{str(path)!r} holds {self.meta['num_images']} image(s); every {HOLDOUT_EVERY}th is "
                             f"held out, which leaves none to train on: extract codes of more images")

    def rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, T) int64, labels (B,) int64) of the given rows."""
        return (torch.from_numpy(self.codes[rows].astype(np.int64)), torch.from_numpy(self.labels[rows]))

    def batch(self, seed: int, step: int, batch_size: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tokens (B, T), labels (B,), a seed for this step's dropout) for `rank` at `step`."""
        rng = np.random.default_rng([seed, step, rank])
        tokens, labels = self.rows(self.train_rows[rng.integers(len(self.train_rows), size=batch_size)])
        return tokens, labels, int(rng.integers(2**62))
