"""Tokenizer evaluation: one set of metrics, one protocol, for the evaluator, the trainer and the study.

    ev = Evaluator(codebook_size, device, lpips_net="alex", fid=True)
    for x in batches:                       # (B, 3, H, W) in [-1, 1], one size per batch
        ev.add_model_batch(model, x)
    metrics = ev.result()                   # summed across ranks; see PROTOCOL

    evaluate_files(model, files, 256, "none", batch_size, device)   # or "tiles", "center", "resize"

Which part of each image is evaluated is the crop mode (CROPS): fixed-size tiles or centre crops
(fullvq.data.folder_images), each image at its own size (`"none"`, cropped to multiples of the
downsampling factor), or a short-side resize to any size S and a centre crop (`"resize"`).
Images of different sizes are batched by size (`size_batches`), with memory bounded by --batch-size.

Reconstructions are clamped and rounded to 8 bits before any metric, as a saved PNG would be, and
originals come from 8-bit files, so every metric compares two 8-bit images. A metric whose weights
cannot be found, or that was switched off, is `None` in the result with the reason under
`unavailable` — never a made-up number.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .data import Skipped, folder_images, short_side_crop, to_tensor
from .distributed import sum_across
from .fid import FeatureStats, InceptionUnavailable, frechet_distance, load_inception
from .metrics import SSIM_WINDOW, CodeCounter, psnr01, psnr_y, ssim

CROPS = ("tiles", "center", "none", "resize")
# Images of more pixels than this (after the crop) are skipped by crop "none" (train/evaluate.py
# --max-pixels): one image goes through the autoencoder whole, and its memory grows with its pixels,
# about 3 GB per megapixel for vq16 in float32 (measured on CPU: 0.74 GB at 512 x 512, 2.35 GB at
# 768 x 1024, one image), so about 12 GB at 4 Mpx (2048 x 2048, 2560 x 1600).
MAX_PIXELS = 2048 * 2048

PROTOCOL = {
    "values": "originals from 8-bit files; reconstructions clamped to [-1, 1] and rounded to 8 bits; "
              "metrics on [0, 1] unless stated",
    "usage": "exact: unique codes over every token of the whole set / K (FVQ's protocol, not a rolling window)",
    "perplexity": "exp(entropy) of the code histogram over the whole set",
    "psnr": "RGB, data_range 1, per image, mean over images",
    "psnr_y": "ITU-R BT.601 Y in [16, 235] (MATLAB rgb2ycbcr), data_range 255, per image, mean over images "
              "(VQGAN-LC, FVQ)",
    "ssim": "Wang et al.: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data_range 1, mean over channels "
            "(= skimage structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False))",
    "lpips": "LPIPS v0.1 ({net}), inputs in [-1, 1], mean over images",
    "rfid": "FID between Inception pool3 (2048-d) features of the originals and of their reconstructions: "
            "{inception}; no JPEG round trip",
}


LPIPS_MIN_SIZE = {"alex": 32, "vgg": 16}  # smaller inputs pool down to nothing inside the backbone


def quantizer_depth(model) -> int:
    """Codes per token position: the residual stages of the model's quantizer (1 without)."""
    return getattr(model.quantize, "depth", 1)


class Evaluator:
    """Accumulates metrics over batches of (original, reconstruction, code indices)."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu", lpips_net: str = "alex",
                 fid: bool = True, perceptual_every: int = 1, depth: int = 1):
        self.device = torch.device(device)
        self.codes = CodeCounter(codebook_size, self.device, depth)  # depth: residual VQ stages
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # psnr, psnr_y, ssim, lpips
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)
        # LPIPS and the FID Inception see images 0, every, 2 * every ... of this rank (all when 1)
        self.perceptual_every, self.seen = max(1, int(perceptual_every)), 0
        self.perceptual_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grids: Counter[tuple[int, int]] = Counter()  # images per token grid (h, w), this rank
        self.unavailable: dict[str, str] = {}
        self.lpips = self.inception = None
        self.lpips_net = lpips_net
        if lpips_net:
            from .losses.lpips import LPIPS, LPIPSUnavailable

            try:
                self.lpips = LPIPS(lpips_net).to(self.device)
            except LPIPSUnavailable as e:
                self.unavailable["lpips"] = str(e)
        else:
            self.unavailable["lpips"] = "switched off"
        if fid:
            try:
                self.inception = load_inception(self.device)
                self.real, self.fake = FeatureStats(device=self.device), FeatureStats(device=self.device)
            except InceptionUnavailable as e:
                self.unavailable["rfid"] = str(e)
        else:
            self.unavailable["rfid"] = "switched off"
        self.protocol = dict(PROTOCOL, lpips=PROTOCOL["lpips"].format(net=lpips_net or "off"),
                             rfid=PROTOCOL["rfid"].format(inception=getattr(self.inception, "source", "off")))

    @torch.no_grad()
    def add_model_batch(self, model, x: torch.Tensor) -> None:
        """Encodes and decodes x (B, 3, H, W) in [-1, 1] with a VQModel and adds the pair; H and W
        are multiples of the model's downsampling factor."""
        x = x.to(self.device)
        recon, out = model(x)
        self.grids[tuple(out.indices.shape[-2:])] += len(x)
        self.add(x, recon, out.indices)

    @torch.no_grad()
    def add(self, x: torch.Tensor, recon: torch.Tensor, indices: torch.Tensor) -> None:
        """x, recon (B, 3, H, W) in [-1, 1]; indices (B, ...) code ids. Every image counts once in the
        means, whatever its size."""
        real, fake = to_unit(x), to_unit(recon)
        if self.lpips is not None and min(x.shape[-2:]) < LPIPS_MIN_SIZE[self.lpips_net]:
            self.lpips = None
            self.unavailable["lpips"] = (f"images of {x.shape[-2]}x{x.shape[-1]} are smaller than "
                                         f"LPIPS-{self.lpips_net}'s minimum of {LPIPS_MIN_SIZE[self.lpips_net]} "
                                         f"pixels")
        self.codes.add(indices)
        keep = (torch.arange(len(x), device=real.device) + self.seen) % self.perceptual_every == 0
        self.seen += len(x)
        real_kept, fake_kept = real[keep], fake[keep]
        per_image = [psnr01(real, fake), psnr_y(real, fake), ssim(real, fake)]
        per_image.append(self.lpips(real_kept * 2 - 1, fake_kept * 2 - 1) if self.lpips is not None and len(real_kept)
                         else torch.zeros(0))
        self.sums += torch.stack([v.to(self.device, torch.float64).sum() for v in per_image])
        self.count += len(x)
        self.perceptual_count += len(real_kept)
        if self.inception is not None and len(real_kept):
            self.real.add(self.inception(real_kept))
            self.fake.add(self.inception(fake_kept))

    @torch.no_grad()
    def seconds_per_image(self, model, size: tuple[int, int]) -> dict[str, float]:
        """Wall seconds per image of the autoencoder, LPIPS and the FID Inception (original and
        reconstruction) at `size` (H, W), timed on 2 random images after a warm-up; adds nothing to
        the metrics."""
        import time

        x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)).to(self.device) * 2 - 1
        parts = {"autoencoder": lambda: model(x)}
        if self.lpips is not None and min(size) >= LPIPS_MIN_SIZE[self.lpips_net]:
            parts["lpips"] = lambda: self.lpips(x, x)
        if self.inception is not None:
            parts["inception"] = lambda: (self.inception(to_unit(x)), self.inception(to_unit(x)))
        cost = {}
        for name, run in parts.items():
            run()
            start = time.perf_counter()
            run()
            cost[name] = (time.perf_counter() - start) / len(x)
        return cost

    def result(self) -> dict:
        """The metrics over every rank's batches: a collective call under torchrun, made once at the end."""
        codes = self.codes.across_ranks()
        count, perceptual = float(sum_across(self.count)), float(sum_across(self.perceptual_count))
        sums = sum_across(self.sums)
        means = (sums[:3] / max(count, 1)).tolist()
        result = {"usage": codes.usage, "num_tokens": codes.num_tokens,
                  "perplexity": codes.perplexity, "dead_codes": codes.dead_codes,
                  "psnr": means[0], "psnr_y": means[1], "ssim": means[2],
                  "lpips": float(sums[3]) / max(perceptual, 1) if self.lpips is not None else None, "rfid": None,
                  "num_images": int(count), "perceptual_images": int(perceptual), "grids": self.grids_across_ranks()}
        if self.inception is not None:
            try:
                result["rfid"] = frechet_distance(*self.real.reduce().moments(), *self.fake.reduce().moments())
            except ValueError as e:
                self.unavailable["rfid"] = str(e)
        return dict(result, protocol=self.protocol, unavailable=dict(self.unavailable))

    def grids_across_ranks(self) -> dict[str, int]:
        """{"hxw": number of images encoded to an h x w token grid}, summed over ranks, largest grid first."""
        total = Counter(self.grids)
        if dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, dict(self.grids))
            total = sum((Counter(part) for part in parts), Counter())
        return {f"{h}x{w}": n for (h, w), n in sorted(total.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0]))}


def evaluate_images(model, images: torch.Tensor, batch_size: int, device, progress: bool = False,
                    evaluator: Evaluator | None = None, **options) -> Evaluator:
    """Runs this rank's images (N, 3, S, S) in [-1, 1] through the model, into `evaluator` (default: a
    new one; `options` go to Evaluator)."""
    evaluator = evaluator or Evaluator(model.quantize.codebook_size, device, depth=quantizer_depth(model),
                                       **options)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True, mininterval=1.0):
        evaluator.add_model_batch(model, images[start:start + batch_size])
    return evaluator


@dataclass
class EvalSkipped(Skipped):
    """Skipped (fullvq.data) plus what the "none" crop leaves out."""

    too_large: list[str] = field(default_factory=list)  # crop "none": more pixels than max_pixels

    def merge(self, other: Skipped) -> None:
        for f in fields(other):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                mine.update(theirs)
            else:
                mine.extend(theirs)


def check_image_size(size: int, factor: int) -> None:
    """A ValueError saying what to use when S x S images cannot be evaluated by a tokenizer with
    downsampling factor f: S must be a multiple of f, and at least SSIM's 11 px window."""
    if size >= SSIM_WINDOW and size % factor == 0:
        return
    lower = size // factor * factor
    near = [s for s in (lower, lower + factor, lower + 2 * factor) if s >= max(SSIM_WINDOW, factor)][:2]
    why = (f"is not a multiple of the tokenizer's downsampling factor {factor} (2 ** (len(ch_mult) - 1))"
           if size % factor else f"is below SSIM's {SSIM_WINDOW} px window")
    raise ValueError(f"image size {size} {why}: use {' or '.join(map(str, near))}")


def native_crop(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(3, H, W) -> (1, 3, H - H % f, W - W % f): the centre part whose sides are multiples of f
    (floor((H % f) / 2) rows dropped at the top, the rest of the H % f at the bottom; columns alike).
    No resizing."""
    _, h, w = image.shape
    top, left = (h % factor) // 2, (w % factor) // 2
    return image[None, :, top:top + h - h % factor, left:left + w - w % factor]


def any_size_images(sources: Iterable, crop: str, size: int, factor: int, skipped: EvalSkipped,
                    max_pixels: int = MAX_PIXELS) -> Iterator[torch.Tensor]:
    """Per readable source (an image file, or a PIL image), (1, 3, H, W) in [-1, 1]:

    crop="none": the image at its own size, centre-cropped to multiples of `factor` (native_crop);
    one whose cropped side is below max(factor, 11) (SSIM's window) is recorded in skipped.too_small,
    one of more than `max_pixels` pixels in skipped.too_large;
    crop="resize": short_side_crop (fullvq.data) to `size`; an image whose short side was below `size` is
    enlarged and recorded in skipped.upscaled.

    Unreadable files are recorded in skipped.unreadable, other modes are converted to RGB and recorded
    in skipped.converted, as fullvq.data.folder_images does."""
    if crop not in ("none", "resize"):
        raise ValueError(f"unknown crop {crop!r}: expected 'none' or 'resize'")
    smallest = max(factor, -(-SSIM_WINDOW // factor) * factor)
    for i, source in enumerate(sources):
        name = str(source) if isinstance(source, (str, Path)) else f"image {i}"
        try:
            if isinstance(source, Image.Image):
                mode, rgb = source.mode, source.convert("RGB")
            else:
                with Image.open(source) as image:
                    mode, rgb = image.mode, image.convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            skipped.unreadable[name] = f"{e.__class__.__name__}: {e}"
            continue
        w, h = rgb.size
        if crop == "none":
            h, w = h - h % factor, w - w % factor
            if min(h, w) < smallest:
                skipped.too_small.append(name)
                continue
            if h * w > max_pixels:
                skipped.too_large.append(name)
                continue
        elif min(w, h) < size:
            skipped.upscaled.append(name)
        if mode != "RGB":
            skipped.converted[name] = mode
        yield native_crop(to_tensor(rgb), factor) if crop == "none" else to_tensor(short_side_crop(rgb, size))[None]


def size_batches(images: Iterable[torch.Tensor], batch_size: int, pixels: int) -> Iterator[torch.Tensor]:
    """Regroups images (n, 3, H, W) of any sizes into batches of one size each: at most `batch_size`
    images and at most `pixels` pixels per batch (an image of more pixels goes alone).

    Images wait in one queue per size; a queue that holds a full batch is sent, and while the waiting
    images hold more than `pixels` pixels the fullest queue is sent as it is. Images of one fixed size
    come out in their order, in batches of min(batch_size, pixels // (H * W)). Between batches at most
    `pixels` pixels wait (plus the image just read), whatever the number of sizes."""
    queues: dict[tuple[int, int], list[torch.Tensor]] = {}
    waiting = 0

    def cap(shape: tuple[int, int]) -> int:
        return max(1, min(batch_size, pixels // (shape[0] * shape[1])))

    def send(shape: tuple[int, int], everything: bool) -> Iterator[torch.Tensor]:
        nonlocal waiting
        batch = torch.cat(queues.pop(shape))
        n = cap(shape)
        while len(batch) >= n or everything and len(batch):
            yield batch[:n]
            waiting -= len(batch[:n]) * shape[0] * shape[1]
            batch = batch[n:]
        if len(batch):
            queues[shape] = [batch]

    for x in images:
        shape = (x.shape[-2], x.shape[-1])
        queues.setdefault(shape, []).append(x)
        waiting += len(x) * shape[0] * shape[1]
        if sum(map(len, queues[shape])) >= cap(shape):
            yield from send(shape, everything=False)
        while waiting > pixels:
            yield from send(max(queues, key=lambda s: sum(map(len, queues[s])) * s[0] * s[1]), everything=True)
    for shape in list(queues):
        yield from send(shape, everything=True)


def planned_images(sources: list, crop: str, size: int, factor: int, max_pixels: int = MAX_PIXELS) -> int:
    """How many images (tiles) evaluate_files will evaluate from `sources` (files or PIL images),
    read from the image headers alone; unreadable files count 0."""
    total = 0
    for source in sources:
        try:
            if isinstance(source, Image.Image):
                w, h = source.size
            else:
                with Image.open(source) as image:
                    w, h = image.size
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
            continue
        if crop == "tiles":
            total += (w // size) * (h // size)
        elif crop == "center":
            total += min(w, h) >= size
        elif crop == "none":
            h, w = h - h % factor, w - w % factor
            total += min(h, w) >= max(factor, -(-SSIM_WINDOW // factor) * factor) and h * w <= max_pixels
        else:
            total += 1
    return total


def evaluate_files(model, files: list, image_size: int, crop: str, batch_size: int, device,
                   progress: bool = True, *, batch_image_size: int | None = None, max_pixels: int = MAX_PIXELS,
                   evaluator: Evaluator | None = None, **options) -> tuple[Evaluator, EvalSkipped]:
    """Runs this rank's image files (or PIL images, for crops "none" and "resize") through the
    model, batch by batch; what was skipped or changed is recorded in the returned EvalSkipped.

    crop: "tiles" or "center" at `image_size` (fullvq.data.folder_images), "none" (each image at its
    own size, see any_size_images; `image_size` unused) or "resize" (short_side_crop to `image_size`).
    A batch holds at most `batch_size` images and at most batch_size x batch_image_size^2 pixels
    (default `image_size`: the memory of `batch_size` model-size images); see size_batches.
    Metrics go into `evaluator` (default: a new one; `options` go to Evaluator)."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}: expected one of {', '.join(CROPS)}")
    evaluator = evaluator or Evaluator(model.quantize.codebook_size, device, depth=quantizer_depth(model),
                                       **options)
    skipped = EvalSkipped()
    bar = tqdm(files, desc="evaluate", unit="image", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    if crop in ("none", "resize"):
        images = any_size_images(bar, crop, image_size, model.encoder.downsample_factor, skipped, max_pixels)
    else:
        images = folder_images(bar, image_size, crop, skipped)
    for batch in size_batches(images, batch_size, batch_size * (batch_image_size or image_size) ** 2):
        evaluator.add_model_batch(model, batch)
    return evaluator, skipped


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped and rounded to the 256 levels of an 8-bit image."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255


def save_code_histogram(path, counts: torch.Tensor, title: str = "") -> None:
    """PNG of the code histogram: token count per code, codes sorted by count (log scale), with
    the uniform level and the number of dead codes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.sort(counts.cpu().numpy())[::-1]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(np.arange(1, len(c) + 1), np.maximum(c, 0.5), lw=1)
    ax.axhline(max(c.sum() / len(c), 0.5), color="gray", ls="--", lw=0.8, label="uniform use")
    ax.set(xscale="log", yscale="log", xlabel="code rank", ylabel="tokens per code",
           title=title or f"{len(c)} codes, {int((c == 0).sum())} dead, {int(c.sum())} tokens")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_grid(path, originals: torch.Tensor, recons: torch.Tensor, columns: int = 8,
              min_tile: int = 128) -> dict[str, list[tuple[int, int]]]:
    """PNG of image pairs: originals (B, 3, H, W) in [-1, 1], each row of them above a row of their
    reconstructions. Rows are labelled "original" / "reconstruction" on the left, columns numbered on
    top; tiles are enlarged by an integer factor (nearest neighbour, so pixels stay sharp) until
    their short side is at least `min_tile` px. Returns each tile's top-left corner in the PNG
    ({"original": [(x, y), ...], "reconstruction": [...]}, in input order)."""
    from PIL import ImageDraw, ImageFont

    n, _, h, w = originals.shape
    columns = max(1, min(columns, n))
    scale = max(1, -(-min_tile // min(h, w)))
    th, tw = h * scale, w * scale
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = ("original", "reconstruction")
    text_h = max(measure.textbbox((0, 0), s, font=font)[3] for s in names + ("0123456789",))
    left = max(measure.textbbox((0, 0), s, font=font)[2] for s in names) + 16
    top, gap, pair_gap = text_h + 12, 2, 12
    pair_rows = -(-n // columns)
    width = left + columns * (tw + gap)
    height = top + pair_rows * (2 * (th + gap) + pair_gap) - pair_gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"{w} px x{scale}", fill=(110, 110, 110), font=font)
    for c in range(columns):
        draw.text((left + c * (tw + gap) + 4, 4), str(c + 1), fill="black", font=font)

    def pixels(t: torch.Tensor) -> Image.Image:
        a = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(a)).resize((tw, th), Image.NEAREST)

    boxes: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    for r in range(pair_rows):
        for k, (name, images) in enumerate(zip(names, (originals, recons), strict=True)):
            y = top + r * (2 * (th + gap) + pair_gap) + k * (th + gap)
            draw.text((6, y + (th - text_h) // 2), name, fill="black", font=font)
            for c in range(columns):
                i = r * columns + c
                if i < n:
                    xy = (left + c * (tw + gap), y)
                    canvas.paste(pixels(images[i]), xy)
                    boxes[name].append(xy)
    canvas.save(path)
    return boxes
