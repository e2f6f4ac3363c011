"""Tokenizer.encode / decode (ONNX Runtime CPU + fullvq_rt's core) against the PyTorch model, eager.

    python bench/encode.py [CKPT] [--threads N] [--repeats R] [--json OUT]
    python bench/encode.py --vq16 [--sizes 256,512] [--batches 1,8] [--repeats R] [--json OUT]

Without CKPT a tiny-preset tokenizer with K = 16384 codes of dimension 8 is built with random
weights (throughput does not depend on training). Both sides get the same images (real photo
tiles), the same thread count, batch 1 and 16. PyTorch's encode is the network plus its usual
full-distance argmin (|z|^2 + |e|^2 - 2 z.e, as LlamaGen computes it); its decode gathers codes
and runs the decoder. fullvq_rt runs the bundle's graphs that are dynamic in H and W, and, side by
side, graphs fixed to the training size (export --fixed-size). Also reports bundle load to first
encode, and whether the indices agree.

--vq16: a LlamaGen VQ-16-sized network (random weights, K = 16384, dimension 8), exported once at
256 px, encoding photos resized to each of --sizes: fullvq_rt against PyTorch eager.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import fullvq_rt
from fullvq.checkpoint import load_model, save
from fullvq.config import preset
from fullvq.data import default_photos
from fullvq.export import export
from fullvq.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from lookup import cpu_model, measure  # noqa: E402


def random_checkpoint(path: Path, name: str = "tiny") -> Path:
    cfg = preset(name)
    cfg.quantizer.codebook_size = 16384
    torch.manual_seed(0)
    model = build_model(cfg)
    save(path, {"config": asdict(cfg), "model": model.state_dict(), "step": 0})
    return path


def write_engine(ckpt: Path, path: Path, dynamic_size: bool) -> Path:
    export(ckpt, path, dynamic_size=dynamic_size)
    return path


def photos_at(n: int, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: the default photos, squashed to size x size (cycling)."""
    photos = default_photos()
    return np.stack([np.asarray(photos[i % len(photos)].convert("RGB").resize((size, size))) for i in range(n)])


def tiles(n: int, size: int) -> np.ndarray:
    out = []
    for photo in default_photos():
        a = np.asarray(photo)
        out += [a[y:y + size, x:x + size] for y in range(0, a.shape[0] - size + 1, size)
                for x in range(0, a.shape[1] - size + 1, size)]
    return np.stack(out[:: max(1, len(out) // n)][:n])


def torch_encode(model, codebook: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network and a full-distance argmin in the bundle's metric (cosine: both sides normalised)."""
    z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    if model.quantize.metric == "cosine":
        z = torch.nn.functional.normalize(z, dim=1)
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.T
    return d.argmin(1)


def to_torch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def seconds(fn, repeats: int) -> float:
    """Median wall time of fn() after a warm-up (bench/lookup.py's measure, without its memory figure)."""
    return measure(fn, repeats)[0]


def interleaved(fns: list, repeats: int) -> list[float]:
    """Median wall time of each fn, their runs taking turns (after one warm-up each) so that machine
    noise hits all alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--vq16", action="store_true", help="a LlamaGen VQ-16-sized network at --sizes")
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    result = vq16_sizes(args, work) if args.vq16 else training_size(args, work)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(result, threads=args.threads, cpu=cpu_model()), indent=1))


def training_size(args, work: Path) -> dict:
    """The table at the training size: PyTorch, fullvq_rt with dynamic graphs, with fixed graphs."""
    ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(work / "ckpt.pt")
    engine = write_engine(ckpt, work / "fvq.engine", dynamic_size=True)
    model, cfg = load_model(ckpt)
    images = tiles(16, cfg.image_size)

    start = time.perf_counter()
    tok = fullvq_rt.Tokenizer(engine, device="cpu", num_threads=args.threads)
    tok.encode(images[0])
    load_s = time.perf_counter() - start
    fixed = fullvq_rt.Tokenizer(write_engine(ckpt, work / "fixed.engine", dynamic_size=False), device="cpu",
                                num_threads=args.threads)

    codebook = torch.from_numpy(tok.codebook.copy())
    rows, agree = [], []
    for batch in (1, 16):
        x_np = images[:batch]
        x = to_torch(x_np)
        ids = tok.encode(x_np)
        with torch.inference_mode():
            ref = torch_encode(model, codebook, x).reshape(ids.shape).numpy()
            agree.append(float((ids == ref).mean()))
            ids_t = torch.from_numpy(ids).long()
            t_enc = seconds(lambda: torch_encode(model, codebook, x), args.repeats)
            t_dec = seconds(lambda: model.decode_codes(ids_t, codebook), args.repeats)
        r_enc, f_enc = interleaved([lambda: tok.encode(x_np), lambda: fixed.encode(x_np)], args.repeats)
        r_dec = seconds(lambda: tok.decode(ids), args.repeats)
        rows.append({"batch": batch, "torch_encode": batch / t_enc, "rt_encode": batch / r_enc,
                     "rt_encode_fixed": batch / f_enc, "torch_decode": batch / t_dec, "rt_decode": batch / r_dec})

    print(f"# Tokenizer vs PyTorch eager: {cfg.preset} preset, K={tok.codebook.shape[0]}, D={tok.codebook.shape[1]}, "
          f"{cfg.image_size} px, {args.threads} threads, {cpu_model()}, torch {torch.__version__}\n")
    print("| batch | encode torch img/s | encode fullvq_rt img/s | speed-up | fixed-size graphs img/s "
          "| dynamic / fixed | decode torch img/s | decode fullvq_rt img/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['torch_encode']:.0f} | {r['rt_encode']:.0f} "
              f"| {r['rt_encode'] / r['torch_encode']:.2f}x | {r['rt_encode_fixed']:.0f} "
              f"| {r['rt_encode'] / r['rt_encode_fixed']:.2f} "
              f"| {r['torch_decode']:.0f} | {r['rt_decode']:.0f} | {r['rt_decode'] / r['torch_decode']:.2f}x |")
    print(f"\nbundle load to first encode: {load_s:.3f} s; indices equal to PyTorch's: "
          + ", ".join(f"{a:.2%}" for a in agree))
    return {"rows": rows, "load_to_first_encode_s": load_s, "agree": agree}


def vq16_sizes(args, work: Path) -> dict:
    """Encode throughput of a VQ-16-sized network at each of --sizes and --batches, one bundle."""
    ckpt = random_checkpoint(work / "vq16.pt", "vq16")
    model, cfg = load_model(ckpt)
    tok = fullvq_rt.Tokenizer(write_engine(ckpt, work / "vq16.engine", dynamic_size=True), device="cpu",
                              num_threads=args.threads)
    codebook = torch.from_numpy(tok.codebook.copy())
    rows = []
    for size in (int(v) for v in args.sizes.split(",")):
        for batch in (int(v) for v in args.batches.split(",")):
            x_np = photos_at(batch, size)
            x = to_torch(x_np)
            ids = tok.encode(x_np)
            with torch.inference_mode():
                agree = float((torch_encode(model, codebook, x).reshape(ids.shape).numpy() == ids).mean())
                t_enc = seconds(lambda: torch_encode(model, codebook, x), args.repeats)
            r_enc = seconds(lambda: tok.encode(x_np), args.repeats)
            rows.append({"size": size, "batch": batch, "grid": list(ids.shape[1:]), "torch_encode": batch / t_enc,
                         "rt_encode": batch / r_enc, "agree": agree})
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"# Encode, LlamaGen VQ-16-sized network (random weights, {params:.1f}M parameters, "
          f"K={tok.codebook.shape[0]}, D={tok.codebook.shape[1]}, {tok.bundle.metric}), one bundle exported at "
          f"{cfg.image_size} px; "
          f"{args.threads} threads, {cpu_model()}, torch {torch.__version__}\n")
    print("| image | tokens | batch | PyTorch eager img/s | fullvq_rt img/s | speed-up | indices equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} px | {r['grid'][0]}x{r['grid'][1]} | {r['batch']} | {r['torch_encode']:.2f} | "
              f"{r['rt_encode']:.2f} | {r['rt_encode'] / r['torch_encode']:.2f}x | {r['agree']:.2%} |")
    return {"vq16_rows": rows}


if __name__ == "__main__":
    main()
