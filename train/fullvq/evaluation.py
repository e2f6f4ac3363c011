"""Tokenizer evaluation: one set of metrics, one protocol, for the evaluator, the trainer and the study.

    ev = Evaluator(codebook_size, device, lpips_net="alex", fid=True)
    for x in batches:                       # (B, 3, S, S) in [-1, 1]
        ev.add_model_batch(model, x)
    metrics = ev.result()                   # summed across ranks; see PROTOCOL

Reconstructions are clamped and rounded to 8 bits before any metric, as a saved PNG would be, and
originals come from 8-bit files, so every metric compares two 8-bit images. A metric whose weights
cannot be found, or that was switched off, is `None` in the result with the reason under
`unavailable` — never a made-up number.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data import Skipped, folder_images
from .distributed import sum_across
from .fid import FeatureStats, InceptionUnavailable, frechet_distance, load_inception
from .metrics import CodeCounter, psnr01, psnr_y, ssim

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


class Evaluator:
    """Accumulates metrics over batches of (original, reconstruction, code indices)."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu", lpips_net: str = "alex",
                 fid: bool = True):
        self.device = torch.device(device)
        self.codes = CodeCounter(codebook_size, self.device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # psnr, psnr_y, ssim, lpips
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)
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
        """Encodes and decodes x (B, 3, S, S) in [-1, 1] with a VQModel and adds the pair."""
        x = x.to(self.device)
        recon, out = model(x)
        self.add(x, recon, out.indices)

    @torch.no_grad()
    def add(self, x: torch.Tensor, recon: torch.Tensor, indices: torch.Tensor) -> None:
        """x, recon (B, 3, S, S) in [-1, 1]; indices (B, ...) code ids."""
        real, fake = to_unit(x), to_unit(recon)
        if self.lpips is not None and min(x.shape[-2:]) < LPIPS_MIN_SIZE[self.lpips_net]:
            self.lpips = None
            self.unavailable["lpips"] = (f"images of {x.shape[-2]}x{x.shape[-1]} are smaller than LPIPS-{self.lpips_net}'s "
                                         f"minimum of {LPIPS_MIN_SIZE[self.lpips_net]} pixels")
        self.codes.add(indices)
        per_image = [psnr01(real, fake), psnr_y(real, fake), ssim(real, fake)]
        per_image.append(self.lpips(real * 2 - 1, fake * 2 - 1) if self.lpips is not None else torch.zeros(len(x)))
        self.sums += torch.stack([v.to(self.device, torch.float64).sum() for v in per_image])
        self.count += len(x)
        if self.inception is not None:
            self.real.add(self.inception(real))
            self.fake.add(self.inception(fake))

    def result(self) -> dict:
        """The metrics over every rank's batches: a collective call under torchrun, made once at the end."""
        codes = self.codes.across_ranks()
        count = float(sum_across(self.count))
        means = (sum_across(self.sums) / max(count, 1)).tolist()
        result = {"usage": codes.usage, "num_tokens": codes.num_tokens,
                  "perplexity": codes.perplexity, "dead_codes": codes.dead_codes,
                  "psnr": means[0], "psnr_y": means[1], "ssim": means[2],
                  "lpips": means[3] if self.lpips is not None else None, "rfid": None,
                  "num_images": int(count)}
        if self.inception is not None:
            try:
                result["rfid"] = frechet_distance(*self.real.reduce().moments(), *self.fake.reduce().moments())
            except ValueError as e:
                self.unavailable["rfid"] = str(e)
        return dict(result, protocol=self.protocol, unavailable=dict(self.unavailable))


def evaluate_images(model, images: torch.Tensor, batch_size: int, device, progress: bool = False,
                    **options) -> Evaluator:
    """Runs this rank's images (N, 3, S, S) in [-1, 1] through the model; `options` go to Evaluator."""
    evaluator = Evaluator(model.quantize.codebook_size, device, **options)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True, mininterval=1.0):
        evaluator.add_model_batch(model, images[start:start + batch_size])
    return evaluator


def evaluate_files(model, files: list, image_size: int, crop: str, batch_size: int, device,
                   progress: bool = True, **options) -> tuple[Evaluator, Skipped]:
    """Runs the tiles or center crops (see data.folder_images) of this rank's image files through the
    model, batch by batch; unreadable and too-small files are recorded in the returned Skipped."""
    evaluator, skipped = Evaluator(model.quantize.codebook_size, device, **options), Skipped()
    pending: list[torch.Tensor] = []
    bar = tqdm(files, desc="evaluate", unit="image", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for crops in folder_images(bar, image_size, crop, skipped):
        pending.append(crops)
        while sum(map(len, pending)) >= batch_size:
            batch = torch.cat(pending)
            evaluator.add_model_batch(model, batch[:batch_size])
            pending = [batch[batch_size:]]
    if sum(map(len, pending)):
        evaluator.add_model_batch(model, torch.cat(pending))
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


def save_grid(path, originals: torch.Tensor, recons: torch.Tensor, columns: int = 8) -> None:
    """PNG of image pairs: each row of originals (B, 3, S, S) in [-1, 1] above its reconstructions."""
    columns = min(columns, len(originals))
    pairs = []
    for i in range(0, len(originals), columns):
        pairs += [originals[i:i + columns], recons[i:i + columns]]
    rows = [torch.cat(list(r), 2) for r in pairs if len(r) == columns]
    grid = ((torch.cat(rows, 1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(np.ascontiguousarray(grid)).save(path)
