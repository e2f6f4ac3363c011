"""The training loop behind train/gpt.py: the class-conditional generator on a codes folder, one process or
many (torchrun), CPU or GPU.

Every random choice of a step (its rows of codes, its dropout masks) is a pure function of (seed, step,
rank), so a resumed run continues bit-identically without carrying RNG state.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint, distributed
from .codes import CodesDataset
from .gpt_config import GPTConfig
from .metrics import steady_step_time
from .models.gpt import GPT, token_loss
from .schedule import lr_factor

EVAL_ROWS = 4096  # at most this many held-out rows (and as many training rows) in the final metrics
NO_CODES = ("no codes to train on: tokenize images with a tokenizer checkpoint first, e.g.\n"
            "    python train/extract_codes.py runs/fvq/ckpt.pt --out runs/codes\n"
            "then train on them with\n"
            "    python train/gpt.py --codes runs/codes")


def train(cfg: GPTConfig, resume: bool = False, stop_at: int | None = None) -> dict | None:
    """Trains to cfg.steps (or until `stop_at`, checkpointing there) on the codes folder cfg.codes and
    returns the final metrics on rank 0 (None elsewhere, and when stopped early). The vocabulary, grid,
    classes and tokenizer of cfg are set from the codes; `resume` continues cfg.out/ckpt.pt."""
    with distributed.session() as d:
        return _train(cfg, d, resume, stop_at)


def check_codes(run: GPTConfig, meta: dict) -> None:
    """A ValueError when the codes folder described by `meta` is not the one the run `run` trained on."""
    diff = [f"{k} {getattr(run, k)!r} in the run, {v!r} in the codes" for k, v in codes_fields(meta).items()
            if getattr(run, k) != v]
    if diff:
        raise ValueError(f"the codes {run.codes!r} do not match the run in {run.out!r} ({'; '.join(diff)}): resume "
                         f"with the codes it was trained on (--codes DIR), or start a new run with another --out")


def codes_fields(meta: dict) -> dict:
    """The GPTConfig fields that a codes folder's meta.json decides."""
    return {"vocab_size": meta["vocab_size"], "grid": tuple(meta["grid"]), "num_classes": meta["num_classes"],
            "tokenizer": meta["tokenizer"]}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on every parameter with ndim >= 2 (matrices, embeddings), none on the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _train(cfg: GPTConfig, d: distributed.Dist, resume: bool, stop_at: int | None) -> dict | None:
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {str(ckpt_path)!r}; run without --resume to start")
        state = checkpoint.require_gpt(checkpoint.load(ckpt_path), ckpt_path)
    if not cfg.codes:
        raise ValueError(NO_CODES)
    if d.main:  # an --out that cannot be written fails here, before any training; killed writes' temp files go
        checkpoint.prepare_run_folder(ckpt_path)
    data = CodesDataset(cfg.codes)
    if state is not None:
        check_codes(GPTConfig.from_dict({**state["config"], "codes": cfg.codes}), data.meta)
    for key, value in codes_fields(data.meta).items():
        setattr(cfg, key, value)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model, cfg.vocab_size, cfg.grid, cfg.num_classes).to(d.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    net = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world > 1 else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and d.device.type == "cuda"
                else nullcontext())

    if d.main:
        checkpoint.truncate_log(out / "log.jsonl", step)
    window, step_times = [], []
    last = min(cfg.steps, stop_at or cfg.steps)
    bar = tqdm(total=cfg.steps, initial=step, disable=not d.main, desc=f"gpt {cfg.preset}", dynamic_ncols=True,
               mininterval=1.0)
    model.train()
    while step < last:
        started = time.perf_counter()
        lr = cfg.lr * lr_factor(step, cfg.steps, cfg.schedule, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, labels, dropout_seed = data.batch(cfg.seed, step, cfg.batch_size, d.rank)
        torch.manual_seed(dropout_seed)
        tokens, labels = tokens.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
        with autocast:
            logits = net(tokens, labels)
        loss = token_loss(logits, tokens)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}: lower lr=... or check the codes")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        step_times.append(time.perf_counter() - started)
        window.append(torch.stack([loss.detach(), (logits.detach().argmax(-1) == tokens).float().mean()]))
        if step % cfg.log_every == 0 or step == last:
            loss_mean, accuracy = distributed.mean_across(torch.stack(window).mean(0)).tolist()
            log = {"step": step, "lr": lr, "loss": loss_mean, "accuracy": accuracy,
                   "step_time_s": sum(step_times[-len(window):]) / len(window)}
            window = []
            if d.main:
                bar.set_postfix(loss=f"{loss_mean:.4f}", acc=f"{accuracy:.1%}")
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(log) + "\n")
        if d.main and (step % cfg.ckpt_every == 0 or step == last):
            checkpoint.save(ckpt_path, {"kind": checkpoint.GPT_KIND, "config": asdict(cfg), "model": model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "step": step})
        bar.update(1)
    bar.close()
    if step < cfg.steps:
        return None
    return _final_metrics(cfg, model, data, d, autocast, step_times)


@torch.no_grad()
def _loss_on(model: GPT, data: CodesDataset, rows: np.ndarray, cfg: GPTConfig, d: distributed.Dist,
             autocast) -> tuple[float, float]:
    """(mean token loss, token accuracy) of `rows` (split over ranks), conditioned on their labels."""
    sums = torch.zeros(3, dtype=torch.float64, device=d.device)  # loss * rows, accuracy * rows, rows
    mine = rows[d.rank::d.world]
    for start in range(0, len(mine), cfg.batch_size):
        tokens, labels = (t.to(d.device) for t in data.rows(mine[start:start + cfg.batch_size]))
        with autocast:
            logits = model(tokens, labels)
        n = len(tokens)
        sums += torch.stack([token_loss(logits, tokens) * n, (logits.argmax(-1) == tokens).float().mean() * n,
                             torch.tensor(float(n), device=d.device)]).double()
    loss_sum, accuracy_sum, count = distributed.sum_across(sums).tolist()
    return loss_sum / count, accuracy_sum / count


def _final_metrics(cfg: GPTConfig, model: GPT, data: CodesDataset, d: distributed.Dist, autocast,
                   step_times: list[float]) -> dict | None:
    """metrics.json: loss and token accuracy (eval mode) on held-out rows and on as many training rows."""
    model.eval()
    heldout = data.heldout_rows[:: max(1, len(data.heldout_rows) // EVAL_ROWS)][:EVAL_ROWS]
    trained = data.train_rows[:: max(1, len(data.train_rows) // len(heldout))][:len(heldout)]
    heldout_loss, heldout_accuracy = _loss_on(model, data, heldout, cfg, d, autocast)
    train_loss, train_accuracy = _loss_on(model, data, trained, cfg, d, autocast)
    if not d.main:
        return None
    metrics = {"preset": cfg.preset, "steps": cfg.steps, "params": model.num_params(),
               "train_loss": train_loss, "train_accuracy": train_accuracy,
               "heldout_loss": heldout_loss, "heldout_accuracy": heldout_accuracy, "heldout_rows": len(heldout),
               "step_time_s": steady_step_time(step_times)}
    checkpoint.atomic_write_text(Path(cfg.out) / "metrics.json", json.dumps(metrics, indent=1))
    return metrics
