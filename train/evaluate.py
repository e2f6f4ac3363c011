"""Evaluate a tokenizer checkpoint: usage, perplexity, PSNR, PSNR-Y, SSIM, LPIPS and rFID.

Offline, except that the first LPIPS use fetches its weights from the package index once
(docs/metrics.md; --lpips-net none does without).

    python train/evaluate.py runs/fvq/ckpt.pt --data DIR [--json OUT] [--crop tiles|center|none]
    python train/evaluate.py runs/vq16/ckpt.pt --data /imagenet/val --image-size 512
    torchrun --nproc_per_node=8 train/evaluate.py ckpt.pt --data /imagenet/val
    python train/evaluate.py vq_ds16_c2i.pt --from llamagen --data DIR     # published weights

Which pixels are evaluated (docs/metrics.md, "Which images"):
  --crop tiles (default)  non-overlapping tiles of the model's training size, no resizing
  --crop center           one centre crop of the training size per image, no resizing
  --crop none             every image at its own size, centre-cropped to multiples of the downsampling
                          factor f (at most f - 1 rows and columns dropped), no resizing ("original
                          resolution"); images of more than --max-pixels pixels are skipped and counted
  --image-size S          short side resized to S (box halvings, then bicubic; smaller images are
                          enlarged), S x S centre crop (ADM/LlamaGen's evaluation transform); S must be a
                          multiple of f
With tiles and center crops, smaller images are skipped and counted; unreadable files are reported
and skipped everywhere. A batch holds at most --batch-size images, and at most the pixels of
--batch-size training-size images (images of different sizes are batched by size). Without --data,
the held-out quarter of the run's own training images is used (the trainer's held-out split). Writes
the JSON (default: eval.json beside the checkpoint) with the protocol used, and a code-histogram PNG
beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from fullvq import checkpoint, distributed, interop
from fullvq.data import MAX_HELDOUT_IMAGES, heldout_tiles, list_images, load_sources, open_rgb, split
from fullvq.evaluation import (MAX_PIXELS, EvalSkipped, Evaluator, check_image_size, evaluate_files,
                               evaluate_images, planned_images, save_code_histogram)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", metavar="DIR", help="folder of images (recursive)")
    p.add_argument("--json", metavar="OUT", help="results file (default: eval.json beside CKPT)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--crop", choices=("tiles", "center", "none"),
                   help="tiles (default) or center crop of the training size, or none: each image at its own size")
    p.add_argument("--image-size", type=int, metavar="S",
                   help="evaluate at S x S after a short-side resize and a centre crop (a multiple of the "
                        "downsampling factor; not with --crop)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"--crop none: skip (and count) images of more than N pixels (default {MAX_PIXELS})")
    p.add_argument("--lpips-net", choices=("alex", "vgg", "none"), default="alex")
    p.add_argument("--no-fid", action="store_true", help="skip rFID (the Inception pass is the slowest part)")
    p.add_argument("--perceptual-sample", type=int, default=0, metavar="N",
                   help="LPIPS and rFID on at most N of the images (every k-th, k = ceil(images / N)); usage, "
                        "PSNR and SSIM on all (default: all; the study uses 512)")
    interop.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.image_size is not None and args.crop is not None:
            raise ValueError(f"--image-size resizes and centre-crops every image; it does not combine with "
                             f"--crop {args.crop}: drop one of them")
        state = checkpoint.state_of(interop.from_arguments(args))
        model, cfg = checkpoint.model_from_state(state)
        factor = model.encoder.downsample_factor
        if args.max_pixels < 1:
            raise ValueError(f"--max-pixels {args.max_pixels}: give a positive number of pixels")
        if args.image_size is not None:
            check_image_size(args.image_size, factor)
        files = list_images(args.data) if args.data else None
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: {e}")
    crop = "resize" if args.image_size is not None else args.crop or "tiles"
    size = args.image_size or cfg.image_size
    with distributed.session() as d:
        model.to(d.device)
        tiles = sources = None
        if files is None and crop in ("tiles", "center"):
            tiles, crop = heldout_tiles(load_sources(cfg.data), cfg.image_size)[d.rank::d.world], "tiles"
            planned = len(tiles)
        else:
            sources = files[d.rank::d.world] if files is not None else list(heldout_regions(cfg, d.rank, d.world))
            planned = planned_images(sources, crop, size, factor, args.max_pixels)
        every = -(-planned // args.perceptual_sample) if args.perceptual_sample > 0 else 1
        evaluator = Evaluator(cfg.quantizer.codebook_size, d.device, lpips_net="" if args.lpips_net == "none"
                              else args.lpips_net, fid=not args.no_fid, perceptual_every=every,
                              depth=cfg.quantizer.residual_depth)
        if d.main:
            print(plan_line(evaluator, model, planned * d.world, every, crop, size, cfg.image_size), flush=True)
        if tiles is not None:
            evaluate_images(model, tiles, args.batch_size, d.device, progress=d.main, evaluator=evaluator)
            skipped = EvalSkipped()
        else:
            _, skipped = evaluate_files(model, sources, size, crop, args.batch_size, d.device, progress=d.main,
                                        batch_image_size=cfg.image_size, max_pixels=args.max_pixels,
                                        evaluator=evaluator)
        metrics = evaluator.result()
        counts = evaluator.codes.across_ranks().counts
        skipped = _gather(skipped)
        if not d.main:
            return None
        metrics["protocol"].update(crop=describe(crop, size, factor, args.max_pixels, heldout=files is None),
                                   crop_mode=crop, image_size="native" if crop == "none" else size,
                                   downsample_factor=factor, training_image_size=cfg.image_size)
        if "converted_from" in state:
            print(interop.describe(state))
            metrics["converted_from"] = state["converted_from"]
        metrics.update(checkpoint=str(args.checkpoint), data=args.data or "held-out split",
                       codebook_size=cfg.quantizer.codebook_size, num_files=len(files) if files else None,
                       skipped_unreadable=len(skipped.unreadable), skipped_too_small=len(skipped.too_small),
                       skipped_too_large=len(skipped.too_large), upscaled=len(skipped.upscaled),
                       converted_to_rgb=len(skipped.converted), skipped=vars(skipped))
        out = Path(args.json) if args.json else Path(args.checkpoint).with_name("eval.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=1))
        save_code_histogram(out.with_suffix(".codes.png"), counts)
        _report(metrics, skipped, out, args.max_pixels)
        return metrics


def plan_line(evaluator: Evaluator, model, planned: int, every: int, crop: str, size: int, trained: int) -> str:
    """What the evaluation will run and about how long it takes, from a timing of 2 images at the
    evaluation size (crop "none": the training size, as a rough guide)."""
    side = trained if crop == "none" else size
    cost = evaluator.seconds_per_image(model, (side, side))
    perceptual = -(-planned // every)
    seconds = planned * cost["autoencoder"] + perceptual * (cost.get("lpips", 0) + cost.get("inception", 0))
    passes = (f"LPIPS on {perceptual}" if "lpips" in cost else "no LPIPS") + ", " + (
        f"the FID Inception on {2 * perceptual} (each resized to 299 x 299)" if "inception" in cost else "no rFID")
    return (f"evaluate: {planned} images ({crop}{'' if crop == 'none' else f', {size} px'}); usage, PSNR and SSIM on "
            f"all; {passes}; about {seconds:.0f} s ({cost['autoencoder'] * 1e3:.0f} ms per image for the "
            f"autoencoder, {cost.get('lpips', 0) * 1e3 + cost.get('inception', 0) * 1e3:.0f} ms per LPIPS + Inception "
            f"pair){'' if every == 1 else f'; --perceptual-sample: LPIPS and rFID on one image in {every}'}")


def heldout_regions(cfg, rank: int, world: int):
    """This rank's held-out regions (PIL images, read one at a time): the right quarter of each training
    image, of the same (up to 256) images as fullvq.data.heldout_tiles."""
    sources = load_sources(cfg.data)
    step = max(1, len(sources) // MAX_HELDOUT_IMAGES)
    return (split(open_rgb(source), cfg.image_size)[1] for source in sources[::step][:MAX_HELDOUT_IMAGES][rank::world])


def describe(crop: str, size: int, factor: int, max_pixels: int, heldout: bool) -> str:
    """The `protocol.crop` line of the results."""
    what = {"tiles": f"non-overlapping {size} px tiles, no resizing",
            "center": f"center {size} px crop, no resizing",
            "none": f"each image at its own size, center-cropped to multiples of the downsampling factor {factor} "
                    f"(at most {factor - 1} rows and columns dropped), no resizing; images of more than "
                    f"{max_pixels} pixels skipped",
            "resize": f"short side resized to {size} px (box halvings while at least {2 * size} px, then "
                          f"bicubic; smaller images enlarged), center {size} px crop"}[crop]
    return ("held-out split of the training data (right quarter of each image), " if heldout else "") + what


def _gather(skipped: EvalSkipped) -> EvalSkipped:
    if not dist.is_initialized():
        return skipped
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, skipped)
    merged = EvalSkipped()
    for part in parts:
        merged.merge(part)
    return merged


def _report(metrics: dict, skipped: EvalSkipped, out: Path, max_pixels: int) -> None:
    for name, reason in skipped.unreadable.items():
        print(f"skipped unreadable {name}: {reason}", file=sys.stderr)
    if skipped.too_small:
        smallest = "the model input" if metrics["protocol"]["crop_mode"] != "none" else (
            f"{max(metrics['protocol']['downsample_factor'], 11)} px after the crop")
        print(f"skipped {len(skipped.too_small)} images smaller than {smallest}", file=sys.stderr)
    if skipped.too_large:
        print(f"skipped {len(skipped.too_large)} images of more than {max_pixels} pixels (--max-pixels)",
              file=sys.stderr)
    if skipped.upscaled:
        print(f"enlarged {len(skipped.upscaled)} images whose short side was below {metrics['protocol']['image_size']} "
              f"px", file=sys.stderr)
    print(f"{'protocol':>11}  {metrics['protocol']['crop']}")
    for key in ("usage", "num_tokens", "perplexity", "dead_codes", "psnr", "psnr_y", "ssim", "lpips", "rfid",
                "num_images"):
        value = metrics[key]
        text = "unavailable: " + metrics["unavailable"][key] if value is None else (
            f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"{key:>11}  {text}")
    print(f"wrote {out} and {out.with_suffix('.codes.png')}")


if __name__ == "__main__":
    main()
