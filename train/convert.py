"""Convert a published LlamaGen or FVQ tokenizer checkpoint into a fullvq checkpoint.

    python train/convert.py vq_ds16_c2i.pt --from llamagen [-o runs/llamagen/ckpt.pt]
    python train/convert.py fvq_262k.pt --from fvq [--bridge-heads N] [--metric l2|cosine]
    python train/fvq.py --resume --out runs/llamagen --data /imagenet/train      # fine-tune it

The architecture and codebook are read off the file's tensor shapes; an FVQ bridge is baked into
the codebook. export/to_trt.py and train/evaluate.py take the same --from flags and convert on the
fly, so this step is needed only to keep the converted file or to fine-tune it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fullvq import checkpoint, interop


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("-o", "--out", metavar="PATH", help="converted checkpoint (default: runs/<CKPT's name>/ckpt.pt)")
    p.add_argument("--image-size", type=int, default=interop.LLAMAGEN_IMAGE_SIZE, metavar="S",
                   help="the input size the model is meant for (default 256, LlamaGen's)")
    interop.add_arguments(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.source == "fullvq":
        p.error("--from llamagen or --from fvq: a fullvq checkpoint needs no conversion")
    out = Path(args.out or Path("runs") / Path(args.checkpoint).stem / "ckpt.pt")
    try:
        state = interop.convert(args.checkpoint, args.source, args.metric, args.bridge_heads, args.image_size)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"convert.py: {e}")
    state["config"]["out"] = str(out.parent)
    checkpoint.save(out, state)
    print(interop.describe(state))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
