"""The command line shared by export/to_trt.py and export/to_onnx.py."""

from __future__ import annotations

import argparse
import sys

from fullvq import interop
from fullvq.export import ExportError, export, export_onnx_files


def batch_range(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX such as 1:8:32, got {text!r}")
    return values


def size_range(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX pixels per side with 1 <= MIN <= OPT <= MAX, such as "
                                         f"16:256:512, got {text!r}")
    return values


def main(onnx_only: bool, argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export a fullvq checkpoint " + (
        "to ONNX (encoder.onnx, decoder.onnx, codebook.npy)" if onnx_only else
        "to an fvq.engine bundle (ONNX graphs, baked codebook, TensorRT plans where TensorRT and a GPU are present)"))
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("-o", "--out", default="onnx" if onnx_only else "fvq.engine",
                   help="output folder" if onnx_only else "bundle file (default fvq.engine)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="the size the graphs are traced and checked at (default: the training size)")
    p.add_argument("--fixed-size", action="store_true",
                   help="graphs for that one size only (default: any H, W that are multiples of f, checked at "
                        "one token, that size and a non-square size)")
    p.add_argument("--generator", metavar="GPT_CKPT", help="also export this generator (train/gpt.py), trained on "
                                                           "this tokenizer's codes")
    if not onnx_only:
        p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16", help="of the TensorRT plans")
        p.add_argument("--batch", type=batch_range, default=(1, 8, 32), metavar="MIN:OPT:MAX",
                       help="TensorRT optimisation profile (default 1:8:32)")
        p.add_argument("--trt-size", type=size_range, metavar="MIN:OPT:MAX",
                       help="TensorRT optimisation profile over the image side in pixels, for both H and W "
                            "(multiples of the downsampling factor f). Default for graphs that take any size: "
                            "f:S:2S, S the export size's larger side; for fixed-size graphs, their one size")
        p.add_argument("--require-trt", action="store_true", help="fail when TensorRT plans cannot be built")
    interop.add_arguments(p)
    args = p.parse_args(argv)
    size = tuple(args.image_size) if args.image_size else None
    try:
        ckpt = interop.from_arguments(args)
        if isinstance(ckpt, dict):
            print(interop.describe(ckpt))
        if onnx_only:
            done = export_onnx_files(ckpt, args.out, size, args.generator, not args.fixed_size)
        else:
            done = export(ckpt, args.out, args.precision, args.batch, size, args.require_trt, args.generator,
                          trt_size=args.trt_size, dynamic_size=not args.fixed_size)
    except (ExportError, ValueError, FileNotFoundError) as e:
        sys.exit(f"export: {e}")
    parity = ", ".join(f"{k} {v:.1e}" for k, v in done.parity.items())
    m = done.manifest
    sizes = (f"any H x W that are multiples of {m['downsample']} (checked at "
             + ", ".join(f"{h}x{w}" for h, w in m["checked_sizes"]) + ")" if m["dynamic_size"] else
             f"only {m['image_size'][0]}x{m['image_size'][1]}: {m['fixed_size_reason']}")
    print(f"wrote {args.out}: ONNX opset checked; ONNX Runtime vs PyTorch max relative difference: {parity}")
    print(f"images: {sizes}")
    if not onnx_only:
        plans = ", ".join(f"{arch} ({e['precision']}, batch {':'.join(map(str, e['batch']))}, size "
                          f"{e['size'][0][0]}x{e['size'][0][1]} to {e['size'][2][0]}x{e['size'][2][1]})"
                          for arch, e in done.manifest["trt"].items()) or "none"
        print(f"TensorRT plans: {plans}" + (f" (skipped: {done.trt_skipped})" if done.trt_skipped else ""))
