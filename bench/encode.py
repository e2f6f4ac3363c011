"""Tokenizer.encode / decode (ONNX Runtime CPU + fullvq_rt's core) against the PyTorch model, eager.

    python bench/encode.py [CKPT] [--threads N] [--repeats R] [--json OUT]

Without CKPT a tiny-preset tokenizer with K = 16384 codes of dimension 8 is built with random
weights (throughput does not depend on training). Both sides get the same images (real photo
tiles), the same thread count, batch 1 and 16. PyTorch's encode is the network plus its usual
full-distance argmin (|z|^2 + |e|^2 - 2 z.e, as LlamaGen computes it); its decode gathers codes
and runs the decoder. Also reports bundle load to first encode, and whether the indices agree.
"""

from __future__ import annotations

import argparse
import json
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


def random_checkpoint(path: Path) -> Path:
    cfg = preset("tiny")
    cfg.quantizer.codebook_size = 16384
    torch.manual_seed(0)
    model = build_model(cfg)
    save(path, {"config": asdict(cfg), "model": model.state_dict(), "step": 0})
    return path


def tiles(n: int, size: int) -> np.ndarray:
    out = []
    for photo in default_photos():
        a = np.asarray(photo)
        out += [a[y:y + size, x:x + size] for y in range(0, a.shape[0] - size + 1, size)
                for x in range(0, a.shape[1] - size + 1, size)]
    return np.stack(out[:: max(1, len(out) // n)][:n])


def torch_encode(model, codebook: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.T
    return d.argmin(1)


def seconds(fn, repeats: int) -> float:
    """Median wall time of fn() after a warm-up (bench/lookup.py's measure, without its memory figure)."""
    return measure(fn, repeats)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(work / "ckpt.pt")
    engine = work / "fvq.engine"
    export(ckpt, engine)
    model, cfg = load_model(ckpt)
    images = tiles(16, cfg.image_size)

    start = time.perf_counter()
    tok = fullvq_rt.Tokenizer(engine, device="cpu", num_threads=args.threads)
    tok.encode(images[0])
    load_s = time.perf_counter() - start

    codebook = torch.from_numpy(tok.codebook.copy())
    rows, agree = [], []
    for batch in (1, 16):
        x_np = images[:batch]
        x = torch.from_numpy(x_np).permute(0, 3, 1, 2).float() / 127.5 - 1
        ids = tok.encode(x_np)
        with torch.inference_mode():
            ref = torch_encode(model, codebook, x).reshape(ids.shape).numpy()
            agree.append(float((ids == ref).mean()))
            ids_t = torch.from_numpy(ids).long()
            t_enc = seconds(lambda: torch_encode(model, codebook, x), args.repeats)
            t_dec = seconds(lambda: model.decode_codes(ids_t, codebook), args.repeats)
        r_enc = seconds(lambda: tok.encode(x_np), args.repeats)
        r_dec = seconds(lambda: tok.decode(ids), args.repeats)
        rows.append({"batch": batch, "torch_encode": batch / t_enc, "rt_encode": batch / r_enc,
                     "torch_decode": batch / t_dec, "rt_decode": batch / r_dec})

    print(f"# Tokenizer vs PyTorch eager: {cfg.preset} preset, K={tok.codebook.shape[0]}, D={tok.codebook.shape[1]}, "
          f"{cfg.image_size} px, {args.threads} threads, {cpu_model()}, torch {torch.__version__}\n")
    print("| batch | encode torch img/s | encode fullvq_rt img/s | speed-up | decode torch img/s | "
          "decode fullvq_rt img/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['torch_encode']:.0f} | {r['rt_encode']:.0f} | {r['rt_encode'] / r['torch_encode']:.2f}x "
              f"| {r['torch_decode']:.0f} | {r['rt_decode']:.0f} | {r['rt_decode'] / r['torch_decode']:.2f}x |")
    print(f"\nbundle load to first encode: {load_s:.3f} s; indices equal to PyTorch's: "
          + ", ".join(f"{a:.2%}" for a in agree))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load_to_first_encode_s": load_s, "agree": agree,
                                               "threads": args.threads, "cpu": cpu_model()}, indent=1))


if __name__ == "__main__":
    main()
