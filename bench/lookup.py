"""Nearest-code lookup on the CPU: fullvq_rt against what research code uses, and the floor.

    python bench/lookup.py [--quick] [--all-kernels] [--repeats N] [--json OUT]

For each (M, K, D): median wall time of each method, its ratio to the compute floor
M*K*(D+2) / (half the fp32 FLOP/s of a 2048^3 torch matmul measured in this run), and the peak
memory it adds (resident-set high-water mark, Linux). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import fullvq_rt

SHAPES = [(4096, 16384, 8), (4096, 16384, 32), (4096, 16384, 256), (1024, 262144, 8), (1024, 262144, 256),
          (256, 16384, 8)]
QUICK_SHAPES = [(4096, 16384, 8), (256, 16384, 8)]
LIBC = ctypes.CDLL("libc.so.6")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def rss_status(key: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024


def measure(fn, repeats: int) -> tuple[float, int]:
    """Median seconds of fn() over `repeats` runs (after one warm-up), and its peak added memory."""
    LIBC.malloc_trim(0)  # hand freed heap pages back, so that reusing them counts as growth
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = rss_status("VmRSS:")
    fn()
    extra = rss_status("VmHWM:") - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), extra


def matmul_flops(torch) -> float:
    a = torch.randn(2048, 2048)
    seconds, _ = measure(lambda: a @ a, 5)
    return 2 * 2048**3 / seconds


def methods(x, codes, kernels, torch, faiss):
    """name -> zero-argument callable computing the (M,) nearest indices."""
    books = {kernel: fullvq_rt.Codebook(codes, kernel=kernel) for kernel in kernels}
    tx, tc = torch.from_numpy(x), torch.from_numpy(codes)
    index = faiss.IndexFlatL2(codes.shape[1])
    index.add(codes)
    return {
        **{f"fullvq_rt Codebook ({k})": (lambda book=book: book.nearest(x)) for k, book in books.items()},
        "fullvq_rt nearest (one-shot)": lambda: fullvq_rt.nearest(x, codes),
        "torch mm + argmin": lambda: ((tc * tc).sum(1) - 2 * tx @ tc.T).argmin(1),
        "torch cdist + argmin": lambda: torch.cdist(tx, tc).argmin(1),
        "faiss IndexFlatL2 k=1": lambda: index.search(x, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--all-kernels", action="store_true", help="also time the AVX2 and portable kernels")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    import faiss
    import torch

    flops = matmul_flops(torch)
    print(f"CPU: {cpu_model()}, CPU kernels {fullvq_rt.cpu_kernels()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads); torch 2048^3 matmul: {flops / 1e9:.0f} GFLOP/s\n")
    print("| M | K | D | method | median ms | x floor | extra MiB | same index as row 1 |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    rows = []
    rng = np.random.default_rng(0)
    for m, k, d in QUICK_SHAPES if args.quick else SHAPES:
        x = rng.standard_normal((m, d), dtype=np.float32)
        codes = rng.standard_normal((k, d), dtype=np.float32)
        floor = m * k * (d + 2) / (flops / 2)
        reference = None
        kernels = fullvq_rt.cpu_kernels() if args.all_kernels else fullvq_rt.cpu_kernels()[:1]
        for name, fn in methods(x, codes, kernels, torch, faiss).items():
            seconds, extra = measure(fn, args.repeats)
            result = fn()
            indices = np.asarray(result[1]).ravel() if isinstance(result, tuple) else np.asarray(result)
            reference = indices if reference is None else reference
            agree = float(np.mean(indices == reference))
            rows.append(dict(m=m, k=k, d=d, method=name, ms=seconds * 1e3, floor_ms=floor * 1e3,
                             x_floor=seconds / floor, extra_mib=extra / 2**20, agreement=agree))
            print(f"| {m} | {k} | {d} | {name} | {seconds * 1e3:.1f} | {seconds / floor:.2f} | "
                  f"{extra / 2**20:.1f} | {agree:.4%} |", flush=True)
        print(f"| {m} | {k} | {d} | *floor* | {floor * 1e3:.1f} | 1.00 | | |")
    if args.json:
        args.json.write_text(json.dumps(dict(cpu=cpu_model(), matmul_gflops=flops / 1e9, rows=rows), indent=1))


if __name__ == "__main__":
    main()
