"""Codebook usage against training budget: what the bridge needs to use every code at 65k and 262k.

    python train/budget_study.py [--only L8,L8-rule] [--runs bridge-65536] [--report-only]

Each experiment tests one hypothesis for the bridge's missing codes at large K as study runs
(fullvq.study: the tiny preset, one seed, evaluated as the study evaluates) in
docs/study/budget/NAME/runs/QUANTIZER-K. Runs are resumable and never retrained once finished; two
processes with different --only or --runs can go side by side (one thread each:
OMP_NUM_THREADS=1). Writes docs/study/usage_vs_budget.md (a table) and usage_vs_budget.png (usage at
10 and 50 tokens per code against training tokens per code, one line per configuration).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from fullvq.study import (RULE_TOKENS_PER_CODE, Plan, StudyError, finished_result, planned_config, run_one,
                          train_tokens_per_code, usage_at)

OUT = Path("docs/study")
BUDGET_KEYS = ("batch_size", "steps")  # overrides that change the budget, not the configuration
BOTH = (("bridge", 65536), ("simvq", 65536), ("bridge", 262144), ("simvq", 262144))
# the 65k and 262k cells of the study before its budget rule (lc had no 262k codebook on a CPU then)
OLD_STUDY = tuple((q, k) for k in (65536, 262144) for q in ("vq", "ema", "fc", "lc", "simvq", "bridge")
                  if (q, k) != ("lc", 262144))
PLOTTED = ("bridge", "simvq", "lc")  # vq, ema and fc keep under 2% of 65k codes (docs/study)


@dataclass(frozen=True)
class Experiment:
    name: str                      # its folder under docs/study/budget ("study": the study's own runs)
    hypothesis: str
    overrides: tuple[str, ...] = ()
    steps: int = 3000
    runs: tuple[tuple[str, int], ...] = (("bridge", 65536),)
    tokens_per_code: float = 0     # the study's budget rule (fullvq.study.planned_batch); 0: none

    def plan(self) -> Plan:
        return Plan(out=OUT if self.name == "study" else OUT / "budget" / self.name,
                    sizes=sorted({k for _, k in self.runs}), quantizers=list(dict.fromkeys(q for q, _ in self.runs)),
                    steps=self.steps, overrides=list(self.overrides), min_train_tokens_per_code=self.tokens_per_code)

    def variant(self) -> str:
        """What the experiment changes besides the budget and the bridge ("" for the study's
        configuration), e.g. "bridge_lr_scale=0.1"."""
        return " ".join(o.removeprefix("quantizer.") for o in self.overrides
                        if o.split("=")[0] not in (*BUDGET_KEYS, "quantizer.bridge"))


EXPERIMENTS = (
    Experiment("batch32", "the study's budget before its rule: 3000 steps of 32 crops (2,048 tokens)",
               runs=OLD_STUDY),
    Experiment("study", f"the study's budget rule, {RULE_TOKENS_PER_CODE} training tokens per code: 4x the "
               "tokens per step at 65k (128 crops), 16x at 262k (512), which costs the bridge nothing", runs=BOTH,
               tokens_per_code=RULE_TOKENS_PER_CODE),
    Experiment("L8", "the paper's bridge (FVQ's scripts: L/8 beyond 16,384 codes)", ("quantizer.bridge=L/8",)),
    Experiment("L8-rule", f"the paper's bridge under the study's rule ({RULE_TOKENS_PER_CODE} training tokens per "
               "code: 128 crops a step at 65k, 512 at 262k)", ("quantizer.bridge=L/8",),
               runs=(("bridge", 65536), ("bridge", 262144)), tokens_per_code=RULE_TOKENS_PER_CODE),
    Experiment("L8-batch256", "the paper's bridge with 8x the tokens per step (750 per code at 65k)",
               ("quantizer.bridge=L/8", "batch_size=256")),
    Experiment("steps12000", "4x the steps at the study's batch", steps=12000),
    Experiment("raw-lr10", "the raw codes learning 10x faster than the bridge", ("quantizer.bridge_raw_lr_scale=10",)),
    Experiment("raw-lr0.1", "the raw codes learning 10x slower than the bridge",
               ("quantizer.bridge_raw_lr_scale=0.1",)),
    Experiment("bridge-lr0.1", "the bridge and its raw codes at a tenth of the autoencoder's lr (FVQ's 1e-4)",
               ("quantizer.bridge_lr_scale=0.1", "quantizer.bridge_raw_lr_scale=0.1")),
    Experiment("dim32", "codes of 32 dimensions, towards FVQ's 256", ("quantizer.codebook_dim=32",)),
    Experiment("dim256", "FVQ's codes of 256 dimensions (32x the lookup work of 8)", ("quantizer.codebook_dim=256",)),
)


def row(experiment: Experiment, result: dict) -> dict:
    cfg = planned_config(experiment.plan(), result["quantizer"], result["codebook_size"])
    return {"experiment": experiment.name, "hypothesis": experiment.hypothesis, "variant": experiment.variant(),
            "quantizer": result["quantizer"], "bridge": result.get("bridge"), "codebook_size": result["codebook_size"],
            "steps": cfg.steps, "batch_size": cfg.batch_size, "train_tokens_per_code": train_tokens_per_code(cfg),
            "dead_positions": result["usage_train_by_density"][-1].get("dead_positions"),
            "usage_10": usage_at(result["usage_train_by_density"], 10),
            "usage_50": usage_at(result["usage_train_by_density"], 50),
            "psnr": result["psnr"], "rfid": result["rfid"], "step_time_s": result["step_time_s"],
            "threads": result.get("threads")}


def tabulated() -> tuple[list[dict], list[str]]:
    """A row for every finished run of every experiment, and the names of the runs not finished:
    read from disk, so that processes running different experiments side by side each write the
    whole report."""
    rows, pending = [], []
    for experiment in EXPERIMENTS:
        for quantizer, k in experiment.runs:
            result = finished_result(experiment.plan(), quantizer, k)
            if result is None:
                pending.append(f"{experiment.name} {quantizer}-{k}")
            else:
                rows.append(row(experiment, result))
    return rows, pending


def write_report(rows: list[dict], pending: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "usage_vs_budget.json").write_text(json.dumps(rows, indent=1))
    lines = ["Command: `python train/budget_study.py` (tiny preset, seed 0; usage_train over fresh training "
             "crops)", "",
             "| experiment | quantizer | K | steps x batch | training tokens / code | usage (10 / code) | "
             "usage (50 / code) | dead patch positions | PSNR | rFID | step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["codebook_size"], r["quantizer"], r["train_tokens_per_code"] or 0)):
        name = " ".join(filter(None, (r["quantizer"], r["bridge"], r["variant"])))
        lines.append(f"| {r['experiment']} | {name} | {r['codebook_size']} | {r['steps']} x {r['batch_size']} | "
                     f"{r['train_tokens_per_code']:.0f} | {r['usage_10']:.1%} | {_pct(r['usage_50'])} | "
                     f"{'' if r['dead_positions'] is None else r['dead_positions']} | "
                     f"{r['psnr']:.2f} | {r['rfid']:.1f} | {r['step_time_s']:.2f} s ({r['threads']} thr) |")
    lines += ["", *(f"Not run yet: {p}" for p in pending)] if pending else []
    lines += ["", "Hypotheses:", *(f"- {e.name}: {e.hypothesis}" for e in EXPERIMENTS)]
    (OUT / "usage_vs_budget.md").write_text("\n".join(lines) + "\n")
    _plot(rows, OUT / "usage_vs_budget.png")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5), dpi=120, sharey=True)
    series: dict[str, list[dict]] = {}
    for r in (r for r in rows if r["quantizer"] in PLOTTED):
        label = " ".join(filter(None, (r["quantizer"], r["bridge"], f"K={r['codebook_size']}", r["variant"])))
        series.setdefault(label, []).append(r)
    colours = dict(zip(series, plt.get_cmap("tab20").colors, strict=False))  # one per series, both panels
    for ax, key, density in ((axes[0], "usage_10", 10), (axes[1], "usage_50", 50)):
        for label, points in series.items():
            points = sorted((p for p in points if p[key] is not None), key=lambda p: p["train_tokens_per_code"])
            if points:
                ax.plot([p["train_tokens_per_code"] for p in points], [100 * p[key] for p in points],
                        marker="o" if points[0]["codebook_size"] < 262144 else "s",
                        linestyle="-" if points[0]["quantizer"] == "bridge" else "--", color=colours.get(label),
                        label=label)
        ax.axhline(99, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xscale="log", xlabel="training tokens per code", title=f"usage_train at {density} tokens per code")
        budgets = sorted({round(r["train_tokens_per_code"]) for points in series.values() for r in points})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("codebook usage %")
    if series:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="experiments to run, by name (default: all)")
    p.add_argument("--runs", help="runs to do, as QUANTIZER-K (default: each experiment's)")
    p.add_argument("--report-only", action="store_true", help="tabulate the finished runs, train nothing")
    args = p.parse_args(argv)
    names = {e.name for e in EXPERIMENTS}
    only = set(args.only.split(",")) if args.only else names
    if only - names:
        sys.exit(f"budget_study.py: unknown experiments {sorted(only - names)}: expected some of {sorted(names)}")
    wanted = set(args.runs.split(",")) if args.runs else None
    todo = [] if args.report_only else [(e, q, k) for e in EXPERIMENTS if e.name in only for q, k in e.runs
                                        if wanted is None or f"{q}-{k}" in wanted]
    for experiment, quantizer, k in todo:
        try:
            run_one(experiment.plan(), quantizer, k)
        except StudyError as e:
            sys.exit(f"budget_study.py: {e}")
        write_report(*tabulated())
    write_report(*tabulated())
    print((OUT / "usage_vs_budget.md").read_text())


if __name__ == "__main__":
    main()
