"""GPU nearest-code lookup: fullvq_rt.Codebook on CUDA arrays vs torch mm + argmin.

For each (M, K, D): x (M, D) and codebook (K, D) float32 on the GPU; prints a Markdown table of
median times (CUDA events, after warm-up) of Codebook(codebook).nearest(x) with the Codebook built
beforehand (its build time in its own column), the hardware floor, speedup over torch and index
agreement with torch.

    python bench/lookup_gpu.py [--quick] [--json OUT]

The floor is max(2 M K D FLOP / fp32 FLOP/s, bytes read and written / bandwidth), with FLOP/s
from a large fp32 torch matmul (TF32 off) and bandwidth from a large device copy, both measured
in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
from typing import Callable

import torch

import fullvq_rt

SHAPES = [  # (M, K, D)
    (16384, 16384, 8),
    (16384, 262144, 8),
    (16384, 262144, 256),
    (4096, 1048576, 8),
    (4096, 16384, 8),
    (1024, 262144, 256),
]
QUICK_MAX_WORK = 1e11  # --quick drops shapes with M * K * D above this
TORCH_CHUNK_BYTES = 8e9  # torch baseline: largest (rows, K) float32 distance block


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms, measured with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||c_k||^2 - 2 <x, c_k>: x (M, D), codebook (K, D) -> (M,) int64, chunked over M."""
    sq = (codebook * codebook).sum(1)
    rows = max(1, min(x.shape[0], int(TORCH_CHUNK_BYTES // (4 * codebook.shape[0]))))
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], rows):
        out[i:i + rows] = torch.addmm(sq, x[i:i + rows], codebook.T, alpha=-2.0).argmin(1)
    return out


def device_info() -> dict:
    """GPU name, driver version and CUDA versions (driver API and torch's runtime)."""
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        driver = "unknown"
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        driver_cuda = f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        driver_cuda = "unknown"
    return {"gpu": props.name, "sms": props.multi_processor_count, "driver": driver,
            "driver_cuda": driver_cuda, "torch_cuda": torch.version.cuda, "torch": torch.__version__}


def measure_peaks(repeats: int) -> tuple[float, float]:
    """(fp32 FLOP/s of an 8192^3 matmul without TF32, bytes/s of a 2 GiB device copy)."""
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    flops = 2 * 8192**3 / (time_ms(lambda: a @ b, repeats) * 1e-3)
    src = torch.empty(1 << 29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src), repeats) * 1e-3)
    return flops, bandwidth


def bench_shape(m: int, k: int, d: int, repeats: int, flops: float, bandwidth: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(m + k + d)
    x = torch.randn(m, d, device="cuda", generator=g)
    codebook = torch.randn(k, d, device="cuda", generator=g)
    build = time_ms(lambda: fullvq_rt.Codebook(codebook), max(1, repeats // 3), warmup=1)
    book = fullvq_rt.Codebook(codebook)
    ours = time_ms(lambda: book.nearest(x), repeats)
    theirs = time_ms(lambda: torch_nearest(x, codebook), repeats)
    agree = (torch.from_dlpack(book.nearest(x)).long() == torch_nearest(x, codebook)).double().mean().item()
    floor = max(2 * m * k * d / flops, 4 * (m * d + k * d + m) / bandwidth) * 1e3
    return {"M": m, "K": k, "D": d, "fullvq_ms": ours, "build_ms": build, "torch_ms": theirs, "floor_ms": floor,
            "speedup": theirs / ours, "x_floor": ours / floor, "agree": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"3 repeats, shapes with M*K*D <= {QUICK_MAX_WORK:g}")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and fullvq_rt.cuda_available()):
        raise SystemExit("needs a CUDA device and a CUDA build of fullvq_rt")
    torch.backends.cuda.matmul.allow_tf32 = False
    repeats = 3 if args.quick else 10
    shapes = [s for s in SHAPES if not args.quick or s[0] * s[1] * s[2] <= QUICK_MAX_WORK]

    info = device_info()
    print(f"GPU: {info['gpu']} ({info['sms']} SMs), driver {info['driver']} (CUDA {info['driver_cuda']}), "
          f"torch {info['torch']} (CUDA {info['torch_cuda']})")
    flops, bandwidth = measure_peaks(repeats)
    print(f"measured: fp32 matmul {flops / 1e12:.1f} TFLOP/s (no TF32), device copy {bandwidth / 1e9:.0f} GB/s\n")

    print("| M | K | D | fullvq ms | Codebook build ms | torch ms | floor ms | speedup vs torch | x floor "
          "| index agreement |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for m, k, d in shapes:
        r = bench_shape(m, k, d, repeats, flops, bandwidth)
        rows.append(r)
        print(f"| {m} | {k} | {d} | {r['fullvq_ms']:.3f} | {r['build_ms']:.3f} | {r['torch_ms']:.3f} | "
              f"{r['floor_ms']:.3f} | "
              f"{r['speedup']:.2f}x | {r['x_floor']:.2f} | {100 * r['agree']:.3f}% |", flush=True)
        torch.cuda.empty_cache()

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": info, "fp32_flops": flops, "bandwidth_bytes_s": bandwidth,
                       "repeats": repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
