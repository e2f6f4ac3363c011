"""Evaluate a tokenizer checkpoint: usage, perplexity, PSNR, PSNR-Y, SSIM, LPIPS and rFID (offline).

    python train/evaluate.py runs/fvq/ckpt.pt --data DIR [--json OUT] [--crop tiles|center]
    torchrun --nproc_per_node=8 train/evaluate.py ckpt.pt --data /imagenet/val
    python train/evaluate.py vq_ds16_c2i.pt --from llamagen --data DIR     # published weights

Images larger than the model's input are cut into non-overlapping tiles of the input size
(--crop tiles, the default) or center-cropped without resizing (--crop center); smaller images are
skipped and counted, unreadable files are reported and skipped. Without --data, the held-out
quarter of the run's own training images is used (the trainer's held-out split). Writes the JSON
(default: eval.json beside the checkpoint) and a code-histogram PNG beside it. docs/metrics.md
says which protocol each metric follows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from fullvq import checkpoint, distributed, interop
from fullvq.data import Skipped, heldout_tiles, list_images, load_sources
from fullvq.evaluation import evaluate_files, evaluate_images, save_code_histogram


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", metavar="DIR", help="folder of images (recursive)")
    p.add_argument("--json", metavar="OUT", help="results file (default: eval.json beside CKPT)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--crop", choices=("tiles", "center"), default="tiles")
    p.add_argument("--lpips-net", choices=("alex", "vgg", "none"), default="alex")
    p.add_argument("--no-fid", action="store_true", help="skip rFID (the Inception pass is the slowest part)")
    interop.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        state = checkpoint.state_of(interop.from_arguments(args))
        model, cfg = checkpoint.model_from_state(state)
        files = list_images(args.data) if args.data else None
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: {e}")
    d = distributed.setup()
    try:
        model.to(d.device)
        options = {"lpips_net": "" if args.lpips_net == "none" else args.lpips_net, "fid": not args.no_fid}
        if files is None:
            tiles = heldout_tiles(load_sources(cfg.data), cfg.image_size)
            evaluator = evaluate_images(model, tiles[d.rank::d.world], args.batch_size, d.device,
                                        progress=d.main, **options)
            skipped, crop = Skipped(), f"held-out split of the training data, {cfg.image_size} px tiles"
        else:
            evaluator, skipped = evaluate_files(model, files[d.rank::d.world], cfg.image_size, args.crop,
                                                args.batch_size, d.device, progress=d.main, **options)
            crop = (f"non-overlapping {cfg.image_size} px tiles" if args.crop == "tiles"
                    else f"center {cfg.image_size} px crop") + ", no resizing"
        metrics = evaluator.result()
        counts = evaluator.codes.across_ranks().counts
        skipped = _gather(skipped)
        if not d.main:
            return None
        metrics["protocol"]["crop"] = crop
        if "converted_from" in state:
            print(interop.describe(state))
            metrics["converted_from"] = state["converted_from"]
        metrics.update(checkpoint=str(args.checkpoint), data=args.data or "held-out split",
                       codebook_size=cfg.quantizer.codebook_size, num_files=len(files) if files else None,
                       skipped_unreadable=len(skipped.unreadable), skipped_too_small=len(skipped.too_small),
                       converted_to_rgb=len(skipped.converted), skipped=vars(skipped))
        out = Path(args.json) if args.json else Path(args.checkpoint).with_name("eval.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=1))
        save_code_histogram(out.with_suffix(".codes.png"), counts)
        _report(metrics, skipped, out)
        return metrics
    finally:
        distributed.teardown()


def _gather(skipped: Skipped) -> Skipped:
    if not dist.is_initialized():
        return skipped
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, skipped)
    merged = Skipped()
    for part in parts:
        merged.unreadable.update(part.unreadable)
        merged.too_small += part.too_small
        merged.converted.update(part.converted)
    return merged


def _report(metrics: dict, skipped: Skipped, out: Path) -> None:
    for name, reason in skipped.unreadable.items():
        print(f"skipped unreadable {name}: {reason}", file=sys.stderr)
    if skipped.too_small:
        print(f"skipped {len(skipped.too_small)} images smaller than the model input", file=sys.stderr)
    for key in ("usage", "num_tokens", "perplexity", "dead_codes", "psnr", "psnr_y", "ssim", "lpips", "rfid",
                "num_images"):
        value = metrics[key]
        text = "unavailable: " + metrics["unavailable"][key] if value is None else (
            f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"{key:>11}  {text}")
    print(f"wrote {out} and {out.with_suffix('.codes.png')}")


if __name__ == "__main__":
    main()
