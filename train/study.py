"""The study: codebook usage and quality against codebook size, for every quantizer, one command.

    python train/study.py [--out docs/study] [--sizes 1024,16384,65536,262144]
        [--quantizers vq,ema,fc,lc,simvq,bridge] [--steps N] [--tokens-per-code T] [--data DIR] [--quick]
        [key=value ...]

Trains every (quantizer, K) on the tiny preset with the same steps and seed, and at least 375
training tokens per code (--tokens-per-code: the batch of 32 crops grows in whole multiples, so
65,536 codes train on 128 crops a step and 262,144 on 512; bridge: FVQ's B/8, or B with the largest
patch of 4, 2 that divides sqrt(K); W128-H4-D2/16 from 1024^2 codes), evaluates each
on the held-out split (usage and PSNR on every tile, LPIPS and rFID on 512 of them) and over fresh
training crops (usage_train at 10 and 50 tokens per code; 10 only beyond 262,144 codes), and writes
OUT/results.json, OUT/results.md and the plots OUT/usage_vs_k.png and OUT/psnr_vs_k.png. The report
covers every cell asked for and every finished run in OUT, so cells run one at a time, or by two
processes side by side (one thread each: OMP_NUM_THREADS=1), add up to one table.
Finished runs are not retrained (one measured at fewer usage_train densities is measured again from
its checkpoint); a finished run of another budget or bridge stops the study with the reason. An
interrupted run resumes from its last checkpoint (every 100 steps). --quick: K = 1024 and 4096, vq
and bridge, 300 steps, no budget rule (minutes). --report-only: write the report from the runs
finished so far (the others as not run yet, or how far their training got), training and
measuring nothing.
key=value overrides apply to every run (e.g. batch_size=16).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

from fullvq.config import QUANTIZERS
from fullvq.study import RULE_TOKENS_PER_CODE, Plan, StudyError, run_one, tabulated, write_report

OUT = Path("docs/study")
QUICK = {"sizes": "1024,4096", "quantizers": "vq,bridge", "steps": 300, "metric_images": 64, "tokens_per_code": 0}
FULL = {"sizes": "1024,16384,65536,262144", "quantizers": ",".join(QUANTIZERS), "steps": 3000, "metric_images": 512,
        "tokens_per_code": RULE_TOKENS_PER_CODE}


def csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--sizes", type=csv(int))
    p.add_argument("--quantizers", type=csv(str))
    p.add_argument("--steps", type=int)
    p.add_argument("--tokens-per-code", type=float, dest="tokens_per_code",
                   help="the budget rule: each run's batch is the preset's times the smallest whole number that "
                        "gives it this many training tokens per code in its steps (default: see below)")
    p.add_argument("--data", default="")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--metric-images", type=int, help="held-out tiles for LPIPS and rFID (default 512, quick 64)")
    p.add_argument("--report-only", action="store_true", help="tabulate the finished runs, train nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    quantizers = args.quantizers or csv(str)(defaults["quantizers"])
    unknown = set(quantizers) - set(QUANTIZERS)
    if unknown:
        sys.exit(f"study.py: unknown quantizers {sorted(unknown)}: expected some of {list(QUANTIZERS)}")
    plan = Plan(out=args.out, sizes=args.sizes or csv(int)(defaults["sizes"]), quantizers=quantizers,
                steps=args.steps or defaults["steps"], data=args.data, overrides=args.overrides,
                metric_images=args.metric_images or defaults["metric_images"],
                min_train_tokens_per_code=defaults["tokens_per_code"] if args.tokens_per_code is None
                else args.tokens_per_code)
    for quantizer, k in [] if args.report_only else [(q, k) for k in plan.sizes for q in plan.quantizers]:
        print(f"== {quantizer} K={k}", flush=True)
        try:
            run_one(plan, quantizer, k)
        except ValueError as e:  # e.g. a K the bridge cannot lay out: the report says why, the study goes on
            print(f"   skipped: {e}", flush=True)
        except StudyError as e:
            sys.exit(f"study.py: {e}")
        _report(args, plan, defaults)
    _report(args, plan, defaults)
    print((plan.out / "results.md").read_text())


def _report(args: argparse.Namespace, plan: Plan, defaults: dict) -> None:
    """OUT's report: every cell asked for, and every finished run in OUT (fullvq.study.tabulated)."""
    shown, results = tabulated(plan)
    write_report(shown, results, _command(args, shown, defaults), _machine())


def _command(args: argparse.Namespace, shown: Plan, defaults: dict) -> str:
    """The command that makes every run of the report (its sizes and quantizers: the report's)."""
    words = ["--quick"] if args.quick else []
    words += ["--out", str(args.out)] if args.out != OUT else []
    words += ["--sizes", ",".join(map(str, shown.sizes))] if shown.sizes != csv(int)(defaults["sizes"]) else []
    if shown.quantizers != csv(str)(defaults["quantizers"]):
        words += ["--quantizers", ",".join(shown.quantizers)]
    words += ["--steps", str(args.steps)] if args.steps else []
    words += ["--tokens-per-code", f"{args.tokens_per_code:g}"] if args.tokens_per_code is not None else []
    words += ["--data", args.data] if args.data else []
    words += ["--metric-images", str(args.metric_images)] if args.metric_images else []
    return shlex.join(["python", "train/study.py", *words, *args.overrides])


def _machine() -> str:
    import os

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{os.cpu_count()} CPU cores ({model}), {gpu}, torch {torch.__version__}"


if __name__ == "__main__":
    main()
