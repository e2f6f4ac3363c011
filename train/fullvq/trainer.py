"""The training loop behind train/fvq.py: one process or many (torchrun), CPU or GPU."""

from __future__ import annotations

import copy
import json
import math
import re
import time
from contextlib import nullcontext
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from . import checkpoint, distributed
from .config import Config
from .data import (TRAIN_CROPS, Skipped, folder_images, heldout_tiles, list_images, load_sources, train_batches,
                   training_crops)
from .evaluation import evaluate_files, evaluate_images, save_grid
from .losses.loss import ReconstructionLoss
from .metrics import CodeCounter, psnr, steady_step_time
from .models import build_model
from .quantizers.bridge import resolve_bridge
from .schedule import SCHEDULES, lr_factor

MIN_TOKENS_PER_CODE = 10  # usage_train is also reported at this density
VAL_CROPS = ("center", "resize", "tiles")


def train(cfg: Config, resume: bool = False, stop_at: int | None = None) -> dict | None:
    """Trains to cfg.steps (or until `stop_at`, checkpointing there) and returns the final metrics
    on rank 0 (None elsewhere, and when stopped early). `resume` continues cfg.out/ckpt.pt."""
    with distributed.session() as d:
        return _train(cfg, d, resume, stop_at)


def _train(cfg: Config, d: distributed.Dist, resume: bool, stop_at: int | None) -> dict | None:
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {str(ckpt_path)!r}; run without --resume to start")
        state = checkpoint.load(ckpt_path)
    sources = load_sources(cfg.data)
    cfg = resolve_run(cfg, d.world, len(sources))
    if cfg.val_data and not Path(cfg.val_data).is_dir():
        raise FileNotFoundError(f"--val-data {cfg.val_data!r} is not a folder: pass a folder of held-out images")
    if d.main:  # an --out that cannot be written fails here, before any training; killed writes' temp files go
        checkpoint.prepare_run_folder(ckpt_path)
    peak_scale = cfg.batch_size * d.world / cfg.lr_base_batch if cfg.lr_base_batch else 1.0
    if state is not None:  # lc's feature width is measured from its codebook file when a run starts
        cfg.quantizer.lc_feature_dim = Config.from_dict(state["config"]).quantizer.lc_feature_dim
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, from_checkpoint=state is not None).to(d.device)
    if state is not None:
        model.load_state_dict(state["model"])
    criterion = ReconstructionLoss(cfg.loss).to(d.device)
    groups = param_groups(model, cfg)
    lr_scales = [group.pop("lr_scale") for group in groups]  # kept here: a checkpoint's groups replace these dicts
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = None
    if cfg.ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    disc_optimizer = None
    if criterion.discriminator is not None:
        disc_optimizer = torch.optim.Adam(criterion.discriminator.parameters(), lr=cfg.loss.disc_lr, betas=cfg.betas)
    step = 0
    if state is not None and "optimizer" in state:  # weights only (train/convert.py): fine-tuning starts at step 0
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if disc_optimizer is not None:
            criterion.discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        step = state["step"]

    net, crit = model, criterion
    if d.world > 1:
        net = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        if criterion.discriminator is not None:
            crit = DDP(criterion, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and d.device.type == "cuda"
                else nullcontext())

    batches = train_batches(training_crops(sources, cfg.image_size, cfg.seed, cfg.train_crops), cfg.batch_size, step,
                            d.rank, d.world, cfg.num_workers, pin_memory=d.device.type == "cuda")
    if state is not None and "optimizer" in state:  # after the loader: starting its iterator draws from the RNG
        torch.set_rng_state(state["rng"])
    if d.main:
        checkpoint.truncate_log(out / "log.jsonl", step)
    window = code_counter(cfg, d.device)
    window_psnr, step_times = [], []
    last = min(cfg.steps, stop_at or cfg.steps)
    bar = tqdm(total=cfg.steps, initial=step, disable=not d.main, desc=f"fvq {cfg.quantizer.name}",
               dynamic_ncols=True, mininterval=1.0)
    model.train()
    while step < last:
        started = time.perf_counter()
        factor = peak_scale * lr_factor(step, cfg.steps, cfg.schedule, cfg.warmup, cfg.decay_start, cfg.final_lr_ratio)
        lr = cfg.lr * factor
        for group, scale in zip(optimizer.param_groups, lr_scales, strict=True):
            group["lr"] = lr * scale
        x = next(batches).to(d.device, non_blocking=True)
        with autocast:
            recon, quant = net(x)
            rec_loss, stats = crit("generator", x, recon.float(), step)
            loss = rec_loss + quant.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}: lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        if criterion.discriminator is not None:  # every step, at weight 0 before disc_start, as LlamaGen and FVQ do
            with autocast:
                d_loss = crit("discriminator", x, recon.float(), step)
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(criterion.discriminator.parameters(), cfg.grad_clip)
            for group in disc_optimizer.param_groups:
                group["lr"] = cfg.loss.disc_lr * factor
            disc_optimizer.step()
        window.add(quant.indices)
        window_psnr.append(psnr(recon.detach(), x).mean())
        step += 1
        step_times.append(time.perf_counter() - started)
        if step % cfg.log_every == 0 or step == last:
            counts = window.across_ranks()
            usage = counts.usage
            log = {"step": step, "lr": lr, "loss": float(loss.detach()), "usage": usage,
                   "psnr": float(distributed.mean_across(torch.stack(window_psnr).mean())),
                   **{k: float(v) for k, v in stats.items()}, **{k: float(v) for k, v in quant.stats.items()},
                   **dead_positions(model, counts)}
            window, window_psnr = code_counter(cfg, d.device), []
            if d.main:
                bar.set_postfix(loss=f"{log['loss']:.4f}", usage=f"{usage:.1%}", psnr=f"{log['psnr']:.2f}")
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(log) + "\n")
        if d.main and (step % cfg.ckpt_every == 0 or step == last):
            checkpoint.save(ckpt_path, _state(cfg, model, ema, optimizer, criterion, disc_optimizer, step))
        bar.update(1)
    bar.close()
    if step < cfg.steps:
        return None
    return _final_evaluation(cfg, model if ema is None else ema.module, sources, d, step_times)


def resolve_run(cfg: Config, world: int, num_images: int) -> Config:
    """The concrete run of `cfg` on `world` processes over `num_images` training images, as a copy:
    an "auto" bridge named, a global batch split over the processes, epochs counted in steps (FVQ's
    len(loader): DistributedSampler's share per rank, whole batches only). Bad values fail here,
    before any work."""
    cfg = copy.deepcopy(cfg)
    for key, value, allowed in (("schedule", cfg.schedule, SCHEDULES), ("train_crops", cfg.train_crops, TRAIN_CROPS),
                                ("val_crop", cfg.val_crop, VAL_CROPS)):
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: expected one of {list(allowed)}")
    if cfg.quantizer.name == "bridge":
        cfg.quantizer.bridge = resolve_bridge(cfg.quantizer.bridge, cfg.quantizer.codebook_size)
    if cfg.global_batch_size:
        if cfg.global_batch_size % world:
            raise ValueError(f"global_batch_size={cfg.global_batch_size} does not split evenly over {world} "
                             f"processes: choose a multiple of {world}, or set the per-process --batch-size")
        cfg.batch_size = cfg.global_batch_size // world
    if cfg.epochs:
        per_epoch = math.ceil(num_images / world) // cfg.batch_size
        if per_epoch == 0:
            raise ValueError(f"epochs={cfg.epochs}: the {num_images} training images hold no whole batch of "
                             f"{cfg.batch_size * world}; pass --steps N, or --data with more images")
        cfg.steps = cfg.epochs * per_epoch
    return cfg


def usage_marks(cfg: Config) -> list[int]:
    """How many fresh crops usage_train counts at: 10 tokens per code and cfg.eval_tokens_per_code
    (or cfg.eval_crops alone when set), ascending."""
    if cfg.eval_crops:
        return [cfg.eval_crops]
    k, per_crop = cfg.quantizer.codebook_size, tokens_per_crop(cfg)
    return sorted({math.ceil(t * k / per_crop) for t in (MIN_TOKENS_PER_CODE, cfg.eval_tokens_per_code)})


def usage_on_fresh_crops(cfg: Config, model, sources, d: distributed.Dist) -> list[dict]:
    """usage_train: the share of codes hit by the first N fresh crops of the training images (a seed
    training never used), at each of usage_marks(cfg), counted across ranks (crop i on rank i % world).
    -> [{"tokens_per_code", "num_tokens", "usage"}], densest last."""
    k, per_crop = cfg.quantizer.codebook_size, tokens_per_crop(cfg)
    fresh = training_crops(sources, cfg.image_size, cfg.seed + 1, cfg.train_crops)
    counter, done, curve, marks = code_counter(cfg, d.device), 0, [], usage_marks(cfg)
    # a smoke run sets eval_crops=N to measure on N crops instead (the bar's ETA says what the default costs)
    bar = tqdm(total=marks[-1], disable=not d.main, unit="crop", dynamic_ncols=True, mininterval=1.0,
               desc=f"usage_train ({marks[-1]} fresh {cfg.image_size} px crops; eval_crops=N for fewer)")
    with torch.no_grad():
        for mark in marks:
            mine = range(done + (d.rank - done) % d.world, mark, d.world)
            for start in range(0, len(mine), cfg.batch_size):
                x = torch.stack([fresh[i] for i in mine[start:start + cfg.batch_size]]).to(d.device)
                counter.add(model.encode(x).indices)
                bar.update(len(x) * d.world)
            done = mark
            counts = counter.across_ranks()
            curve.append({"tokens_per_code": mark * per_crop / k, "num_tokens": mark * per_crop,
                          "usage": counts.usage, **dead_positions(model, counts)})
    bar.close()
    return curve


def code_counter(cfg: Config, device: torch.device) -> CodeCounter:
    """An empty histogram of the run's codes (per stage of a residual quantizer)."""
    return CodeCounter(cfg.quantizer.codebook_size, device, cfg.quantizer.residual_depth)


def dead_positions(model, counts: CodeCounter) -> dict:
    """{"dead_positions": n} for a bridge (BridgeQuantizer.dead_positions), {} for other quantizers."""
    quantize = getattr(model, "module", model).quantize
    return {"dead_positions": quantize.dead_positions(counts.counts)} if hasattr(quantize, "dead_positions") else {}


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """The optimiser's groups, each with its "lr_scale": one group of everything (FVQ's), unless
    quantizer.bridge_lr_scale or bridge_raw_lr_scale differ from 1, which give the bridge network
    and its raw codes groups of their own at those multiples of the lr."""
    scales = {"bridge.": cfg.quantizer.bridge_lr_scale, "raw": cfg.quantizer.bridge_raw_lr_scale}
    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        # quantize.bridge.* / quantize.raw, or the same in each stage of a residual quantizer
        part = re.match(r"quantize\.(?:stages\.\d+\.)?(bridge\.|raw$)", name)
        scale = scales[part.group(1)] if part else 1.0
        groups.setdefault(scale, []).append(param)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def tokens_per_crop(cfg: Config) -> int:
    """Tokens one training crop encodes to."""
    return (cfg.image_size // 2 ** (len(cfg.model.ch_mult) - 1)) ** 2


def _state(cfg, model, ema, optimizer, criterion, disc_optimizer, step) -> dict:
    state = {"config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "step": step, "rng": torch.get_rng_state()}
    if ema is not None:
        state["ema"] = ema.state_dict()  # module.* weights and n_averaged
    if disc_optimizer is not None:
        state["discriminator"] = criterion.discriminator.state_dict()
        state["disc_optimizer"] = disc_optimizer.state_dict()
    return state


def _final_evaluation(cfg: Config, model, sources, d: distributed.Dist, step_times: list[float]) -> dict | None:
    """metrics.json (held-out usage/PSNR, usage over fresh training crops, step time) and a grid,
    of `model` (the EMA weights when the run keeps them). Held out: cfg.val_data's images, else the
    split's held-out tiles; "resize" crops without val_data leave nothing held out."""
    model.eval()
    cheap = {"lpips_net": "", "fid": False}  # LPIPS and rFID: train/evaluate.py
    if cfg.val_data:
        files = list_images(cfg.val_data)
        evaluator = evaluate_files(model, files[d.rank::d.world], cfg.image_size, cfg.val_crop, cfg.batch_size,
                                   d.device, progress=d.main, **cheap)[0]
        metrics = evaluator.result() | {"heldout": f"{cfg.val_data}: {cfg.val_crop} crops of {cfg.image_size} px"}
        crops = list(islice(folder_images(files, cfg.image_size, cfg.val_crop, Skipped()), 16))
        if not crops:
            raise ValueError(f"--val-data {cfg.val_data!r} holds no readable image of at least {cfg.image_size} px")
        preview = torch.cat(crops)[:16]
    elif cfg.train_crops == "split":
        heldout = heldout_tiles(sources, cfg.image_size)
        metrics = evaluate_images(model, heldout[d.rank::d.world], cfg.batch_size, d.device, **cheap).result()
        metrics["heldout"] = f"non-overlapping {cfg.image_size} px tiles of the right quarter of each training image"
        preview = heldout[:16]
    else:
        metrics = {"heldout": "none: training crops cover whole images; set val_data (--val-data DIR) to evaluate"}
        fresh = training_crops(sources, cfg.image_size, cfg.seed + 1, cfg.train_crops)
        preview = torch.stack([fresh[i] for i in range(16)])
    usage_train = usage_on_fresh_crops(cfg, model, sources, d)
    if not d.main:
        return None
    metrics.update(
        quantizer=cfg.quantizer.name, codebook_size=cfg.quantizer.codebook_size, steps=cfg.steps,
        usage_train=usage_train[-1]["usage"], num_tokens_train=usage_train[-1]["num_tokens"],
        usage_train_by_density=usage_train, step_time_s=steady_step_time(step_times),
    )
    out = Path(cfg.out)
    checkpoint.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    with torch.no_grad():
        x = preview.to(d.device)
        save_grid(out / "reconstructions.png", x, model(x)[0])
    return metrics
