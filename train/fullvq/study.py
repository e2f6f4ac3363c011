"""The usage-vs-codebook-size study behind train/study.py: one run per (quantizer, K), same budget
and seed, each trained by the trainer and evaluated by the evaluator on the held-out split.

Runs live in OUT/runs/<quantizer>-<K>/ (ckpt.pt, metrics.json, result.json); a run with a
result.json is never retrained, and an interrupted one resumes from its checkpoint. A finished run
measured at fewer usage densities than the plan asks for is measured again from its checkpoint
(usage only). VQGAN-LC's feature codebooks are built once per K into OUT/lc/.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import checkpoint, distributed
from .config import QUANTIZERS, Config, apply_override, preset
from .data import heldout_tiles, load_sources
from .evaluation import evaluate_images
from .quantizers.bridge import check_grid, parse_bridge, resolve_bridge
from .trainer import MIN_TOKENS_PER_CODE, tokens_per_crop, train, usage_marks, usage_on_fresh_crops

RESULT_KEYS = ("quantizer", "codebook_size", "usage", "num_tokens", "psnr", "psnr_y", "ssim", "lpips", "rfid",
               "step_time_s", "steps")
# usage_train's second density is asked for up to this K: FVQ's own count there is 49 tokens per code
# (12.8M ImageNet-val tokens over 262,144 codes); 50 per code at 1M codes would be 52M lookups, hours on a CPU
DENSE_USAGE_MAX_K = 262_144
# The study's budget rule (planned_batch): every K trains on at least the tokens per code that 3000
# steps of 32 crops give 16,384 codes, where the bridge uses >= 99% of them. At 65,536 codes the
# 94 per code of the same batch left 6 of B/8's 64 patch positions dead (89.4%); 375 left none
# (99.1%): docs/study/usage_vs_budget.md.
RULE_TOKENS_PER_CODE = 375


class StudyError(RuntimeError):
    """The study cannot go on as asked (the message says why and what to do)."""


@dataclass
class Plan:
    out: Path
    sizes: list[int]
    quantizers: list[str]
    steps: int
    data: str = ""
    overrides: list[str] = field(default_factory=list)
    metric_images: int = 512        # held-out tiles that LPIPS and rFID see (usage and PSNR see all)
    eval_tokens_per_code: int = 50  # usage_train's second density (the first is 10 tokens per code)
    min_train_tokens_per_code: float = 0  # the budget rule (planned_batch); 0: the preset's batch at every K

    def run_dir(self, quantizer: str, k: int) -> Path:
        return self.out / "runs" / f"{quantizer}-{k}"

    def tokens_per_code(self, k: int) -> int:
        """The densest usage_train this plan measures at K."""
        return self.eval_tokens_per_code if k <= DENSE_USAGE_MAX_K else MIN_TOKENS_PER_CODE


def planned_config(plan: Plan, quantizer: str, k: int) -> Config:
    """The run this plan trains at (quantizer, K): the tiny preset, the plan's steps, overrides,
    bridge and batch, and for lc the path of its codebook (build_lc_codebook_once builds it)."""
    cfg = preset("tiny")
    cfg.quantizer.name, cfg.quantizer.codebook_size, cfg.steps = quantizer, k, plan.steps
    cfg.data, cfg.out, cfg.eval_tokens_per_code = plan.data, str(plan.run_dir(quantizer, k)), plan.tokens_per_code(k)
    cfg.quantizer.bridge = bridge_for(k)
    cfg.ckpt_every = 100  # a 262k step takes ~7 s on one CPU core: a stopped study loses minutes, not half an hour
    for assignment in plan.overrides:
        apply_override(cfg, assignment)
    if quantizer == "bridge":
        cfg.quantizer.bridge = resolve_bridge(cfg.quantizer.bridge, k)
        check_grid(k, parse_bridge(cfg.quantizer.bridge).patch)  # a K it cannot lay out: ValueError, no run folder
    if quantizer == "lc":
        cfg.quantizer.lc_codebook = str(plan.out / "lc" / f"codebook-{k}.pt")
    cfg.batch_size = planned_batch(plan, cfg)
    return cfg


def planned_batch(plan: Plan, cfg: Config) -> int:
    """The budget rule: cfg's batch times the smallest whole number that gives the run at least
    plan.min_train_tokens_per_code training tokens per code in its steps. More tokens per step
    rather than more steps: the bridge's pass over the codebook costs the same at any batch, so the
    same tokens cost it least in the fewest steps."""
    return cfg.batch_size * max(1, math.ceil(plan.min_train_tokens_per_code / train_tokens_per_code(cfg)))


def train_tokens_per_code(cfg: Config) -> float:
    """Training tokens the run's quantizer sees per code: steps x batch x tokens per crop / K."""
    return cfg.steps * cfg.batch_size * tokens_per_crop(cfg) / cfg.quantizer.codebook_size


def bridge_for(k: int) -> str:
    """FVQ's B/8 (128 wide, the tiny preset's), or B with the largest patch of 4, 2 that divides the
    grid's side; from 1024^2 codes W128-H4-D2/16, B's shape with a patch FVQ does not name (B/8 would
    attend over 16,384 tokens). A K the bridge cannot lay out gets B/8, whose check then explains why."""
    side = math.isqrt(k)
    if side >= 1024:
        return "W128-H4-D2/16"
    return f"B/{next((p for p in (8, 4, 2) if side * side == k and side % p == 0), 8)}"


def build_lc_codebook_once(cfg: Config) -> None:
    """The lc run's codebook file, built on first use from enough patch features (4 per code); beyond
    a CPU's few minutes of flat k-means, by two-level k-means (fullvq.lc_codebook.build_lc_codebook)."""
    from .lc_codebook import build_lc_codebook

    path, k = Path(cfg.quantizer.lc_codebook), cfg.quantizer.codebook_size
    if not path.is_file():
        images = len(load_sources(cfg.data))
        crops = max(32, math.ceil(4 * k / (images * 196)))  # 196 = 14 x 14 features per 224 px crop
        build_lc_codebook(cfg.data or None, k, path, crops_per_image=crops, iters=10, progress=True)


def finished_result(plan: Plan, quantizer: str, k: int) -> dict | None:
    """The run's result.json as it stands (None when the run has not finished)."""
    folder = plan.run_dir(quantizer, k)
    if not (folder / "result.json").is_file():
        return None
    return json.loads((folder / "result.json").read_text())


def tabulated(plan: Plan) -> tuple[Plan, list[dict]]:
    """The plan widened to every size and quantizer with a finished run in plan.out, and one result per
    cell of it, K by K: the finished run's, or why there is none (the reason the cell cannot be laid
    out, how far an unfinished run got, or "not run yet"). What a report shows, so that a study run
    cell by cell, or by two processes side by side, never leaves a report of fewer cells than it has."""
    done = {p.parent: json.loads(p.read_text()) for p in (plan.out / "runs").glob("*/result.json")}
    extra = {r["quantizer"] for r in done.values()} - set(plan.quantizers)
    shown = replace(plan, sizes=sorted({*plan.sizes, *(r["codebook_size"] for r in done.values())}),
                    quantizers=[*plan.quantizers, *(q for q in QUANTIZERS if q in extra)])
    return shown, [done.get(shown.run_dir(q, k))
                   or {"quantizer": q, "codebook_size": k, "skipped": _why_not_run(shown, q, k)}
                   for k in shown.sizes for q in shown.quantizers]


def _why_not_run(plan: Plan, quantizer: str, k: int) -> str:
    try:
        cfg = planned_config(plan, quantizer, k)
    except ValueError as e:  # e.g. a K the bridge cannot lay out
        return str(e)
    return _how_far(plan.run_dir(quantizer, k), cfg) or "not run yet"


def _how_far(folder: Path, cfg: Config) -> str | None:
    """How far an unfinished run got, from the last whole line of its training log (None: no log).
    Its window usage is a sign, not usage_train: codes hit by the last log_every steps' tokens."""
    log = folder / "log.jsonl"
    for line in reversed(log.read_text(errors="replace").splitlines() if log.is_file() else []):
        try:
            last = json.loads(line)
        except ValueError:  # cut short by a kill
            continue
        fate = "resumes from its checkpoint" if (folder / "ckpt.pt").is_file() else "no checkpoint here: starts over"
        return (f"unfinished, step {last['step']} of {cfg.steps} ({fate}): its last {cfg.log_every} steps used "
                f"{last['usage']:.2%} of the codes, training PSNR {last['psnr']:.2f}")
    return None


def check_comparable(plan: Plan, result: dict) -> None:
    """StudyError unless a finished run is the one this plan would train (steps, batch, bridge)."""
    folder = plan.run_dir(result["quantizer"], result["codebook_size"])
    want = planned_config(plan, result["quantizer"], result["codebook_size"])
    if "batch_size" not in result:
        raise StudyError(f"{folder} holds a finished run from before the study recorded batch sizes: add its "
                         f"\"batch_size\" to its result.json, or move that folder away to train it anew")
    if (result["steps"], result["batch_size"]) != (want.steps, want.batch_size):
        raise StudyError(f"{folder} holds a finished run of {result['steps']} steps x {result['batch_size']} crops, "
                         f"this study asks for {want.steps} x {want.batch_size}: use another --out (runs of "
                         f"different budgets are not comparable)")
    bridge = want.quantizer.bridge if result["quantizer"] == "bridge" else None
    if result.get("bridge") != bridge:
        raise StudyError(f"{folder} holds a finished run of the bridge {result.get('bridge')}, this study trains "
                         f"{bridge}: use another --out, or move that folder away to train it anew")


def run_one(plan: Plan, quantizer: str, k: int) -> dict:
    """The run's result (trained and evaluated now, or read back and completed)."""
    folder = plan.run_dir(quantizer, k)
    if (result := finished_result(plan, quantizer, k)) is not None:
        check_comparable(plan, result)
        return _with_usage_densities(plan, result, folder)
    cfg = planned_config(plan, quantizer, k)
    checkpoint.prepare_run_folder(folder / "ckpt.pt")  # writable, and rid of the temporary files of killed writes
    if quantizer == "lc":
        build_lc_codebook_once(cfg)
    ckpt = folder / "ckpt.pt"
    step = checkpoint.load(ckpt)["step"] if ckpt.is_file() else 0
    if step >= cfg.steps and (folder / "metrics.json").is_file():  # trained; the evaluation below was interrupted
        metrics = json.loads((folder / "metrics.json").read_text())
    else:  # a new run, or the rest of an interrupted one (its final evaluation included)
        metrics = train(cfg, resume=step > 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = checkpoint.load_model(ckpt)[0].to(device)
    tiles = heldout_tiles(load_sources(cfg.data), cfg.image_size)
    subset = tiles[torch.randperm(len(tiles), generator=torch.Generator().manual_seed(0))[:plan.metric_images]]
    perceptual = evaluate_images(model, subset, cfg.batch_size, device).result()
    result = {key: metrics.get(key) for key in RESULT_KEYS} | _usage_fields(metrics["usage_train_by_density"])
    result.update(lpips=perceptual["lpips"], rfid=perceptual["rfid"], metric_images=len(subset),
                  batch_size=cfg.batch_size, train_tokens_per_code=train_tokens_per_code(cfg),
                  bridge=cfg.quantizer.bridge if quantizer == "bridge" else None, unavailable=perceptual["unavailable"],
                  threads=torch.get_num_threads())  # step_time_s depends on it (runs may go two at a time)
    checkpoint.atomic_write_text(folder / "result.json", json.dumps(result, indent=1))  # a kill: old or new, never torn
    return result


def _usage_fields(curve: list[dict]) -> dict:
    """usage_train at 10 tokens per code (the sparsest count, the one every K has) and the whole curve."""
    return {"usage_train": curve[0]["usage"], "num_tokens_train": curve[0]["num_tokens"],
            "usage_train_by_density": curve}


def _with_usage_densities(plan: Plan, result: dict, folder: Path) -> dict:
    """A finished run's result, with usage_train measured again from its checkpoint (nothing else
    redone) when it lacks a density the plan asks for, or a bridge's dead patch positions. A run
    whose checkpoint is gone keeps its own."""
    curve = result.get("usage_train_by_density") or json.loads((folder / "metrics.json").read_text())[
        "usage_train_by_density"]
    wanted = {MIN_TOKENS_PER_CODE, plan.tokens_per_code(result["codebook_size"])}
    no_dead_positions = result["quantizer"] == "bridge" and any("dead_positions" not in c for c in curve)
    ckpt = folder / "ckpt.pt"
    if ckpt.is_file() and (no_dead_positions or any(usage_at(curve, t) is None for t in wanted)):
        state = checkpoint.load(ckpt)  # its config decides what is counted (eval_crops): read only when needed
        cfg = Config.from_dict(state["config"])
        cfg.eval_tokens_per_code = plan.tokens_per_code(result["codebook_size"])
        if no_dead_positions or {m * tokens_per_crop(cfg) for m in usage_marks(cfg)} - {c["num_tokens"] for c in curve}:
            print(f"   usage_train at {cfg.eval_tokens_per_code} tokens per code, from {ckpt}", flush=True)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = checkpoint.model_from_state(state)[0].to(device)
            curve = usage_on_fresh_crops(cfg, model, load_sources(cfg.data), distributed.Dist(device=device))
    if curve == result.get("usage_train_by_density"):
        return result
    result = result | _usage_fields(curve)
    checkpoint.atomic_write_text(folder / "result.json", json.dumps(result, indent=1))
    return result


def write_report(plan: Plan, results: list[dict], command: str, machine: str) -> None:
    """results.json, results.md (a table) and the two plots."""
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"Command: `{command}`  ", f"Report written on: {machine}", "",
             f"| quantizer | K | usage_train ({MIN_TOKENS_PER_CODE} tokens/code) | usage_train "
             f"({plan.eval_tokens_per_code} tokens/code) | held-out usage | tokens (held-out) | PSNR | SSIM | "
             f"LPIPS ({plan.metric_images} tiles) | rFID ({plan.metric_images} tiles) | steps x batch | step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['quantizer']} | {r['codebook_size']} | {r['skipped']} ||||||||||")
            continue
        dense = usage_at(r.get("usage_train_by_density", []), plan.eval_tokens_per_code)
        lines.append(f"| {_label(r)} | {r['codebook_size']} | {r['usage_train']:.1%} | {_fmt(dense, '.1%')} | "
                     f"{r['usage']:.1%} | "
                     f"{r['num_tokens']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {_fmt(r['lpips'], '.3f')} | "
                     f"{_fmt(r['rfid'], '.1f')} | {r['steps']} x {r['batch_size']} | {_seconds(r['step_time_s'])} "
                     f"({r.get('threads', '?')} thr) |")
    (plan.out / "results.md").write_text("\n".join(lines) + "\n")
    finished = [r for r in results if "skipped" not in r]
    usage = {f"usage_train at {t} tokens per code":
             lambda r, t=t: _percent(usage_at(r.get("usage_train_by_density", []), t))
             for t in (MIN_TOKENS_PER_CODE, plan.eval_tokens_per_code)}
    _plot(plan.out / "usage_vs_k.png", finished, "codebook usage (%), fresh training crops", usage)
    _plot(plan.out / "psnr_vs_k.png", finished, "held-out PSNR (dB)", {"": lambda r: r["psnr"]})


def _label(result: dict) -> str:
    """"bridge B/8": the quantizer, and the bridge each bridge run used."""
    return f"{result['quantizer']} {result['bridge']}" if result.get("bridge") else result["quantizer"]


def usage_at(curve: list[dict], tokens_per_code: int) -> float | None:
    """usage_train at this many tokens per code from a usage_train_by_density curve (None when not measured)."""
    return next((c["usage"] for c in curve if round(c["tokens_per_code"]) == tokens_per_code), None)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _plot(path: Path, results: list[dict], ylabel: str, panels: dict[str, Callable[[dict], float | None]]) -> None:
    """One panel per title in panels, each a line per quantizer of panels[title](result) against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), dpi=120, sharey=True, squeeze=False)
    for ax, (title, value) in zip(axes[0], panels.items(), strict=True):
        for quantizer in dict.fromkeys(r["quantizer"] for r in results):
            points = sorted((r["codebook_size"], v) for r in results
                            if r["quantizer"] == quantizer and (v := value(r)) is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=quantizer)
        ax.set(xscale="log", xlabel="codebook size K", title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[0][0].set_ylabel(textwrap.fill(ylabel, 36))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
