"""Generation: fullvq_rt.Generator (ONNX Runtime + the C++ sampling loop) against the PyTorch
reference loop (fullvq.sampling.generate: eager, and with torch.compile where it works).

    python bench/generate.py [--presets tiny,B] [--batches 1,8,32] [--threads N] [--repeats R]
        [--sampler-vocab 262144] [--json OUT]

Models have random weights (speed does not depend on training); every side gets the same model,
classes, CFG scale 4, top-k 1000 (clamped to the vocabulary) and the same thread count. tokens/s
counts generated tokens (images x h*w), not the doubled CFG rows. The last table is the sampler's
share of a decode step: the C++ sampler on (2B, V) logits against one PyTorch decode step of the
same preset with that vocabulary, at batch 8 with CFG.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import fullvq_rt
from fullvq.checkpoint import save
from fullvq.config import preset
from fullvq.export import export
from fullvq.gpt_config import gpt_preset
from fullvq.models import GPT, build_model
from fullvq.sampling import generate
from fullvq_rt.sampling import sample_logits

sys.path.insert(0, str(Path(__file__).parent))
from lookup import cpu_model, measure  # noqa: E402

GRIDS = {"tiny": (8, 8), "B": (16, 16)}  # tokens per image: the tiny tokenizer at 32 px, LlamaGen's VQ-16 at 256 px
VOCAB = 16384
CFG, TOP_K = 4.0, 1000


def random_gpt(preset_name: str, vocab: int, grid: tuple[int, int], num_classes: int = 1000) -> tuple[GPT, dict]:
    cfg = gpt_preset(preset_name)
    cfg.vocab_size, cfg.grid, cfg.num_classes = vocab, grid, num_classes
    torch.manual_seed(0)
    model = GPT(cfg.model, vocab, grid, num_classes)
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)  # the zero-initialised head would make every logit equal
    return model.eval(), {"kind": "gpt", "config": asdict(cfg), "model": model.state_dict(), "step": 0}


def bundle_for(preset_name: str, folder: Path) -> tuple[Path, GPT]:
    """An fvq.engine with a random tiny tokenizer (VOCAB codes, the preset's grid) and a random generator."""
    grid = GRIDS[preset_name]
    tok = preset("tiny")
    tok.quantizer.codebook_size, tok.image_size = VOCAB, 4 * grid[0]
    torch.manual_seed(0)
    save(folder / "tok.pt", {"config": asdict(tok), "model": build_model(tok).state_dict(), "step": 0})
    model, state = random_gpt(preset_name, VOCAB, grid)
    save(folder / "gpt.pt", state)
    export(folder / "tok.pt", folder / f"{preset_name}.engine", generator=folder / "gpt.pt")
    return folder / f"{preset_name}.engine", model


def loops(model: GPT, engine: Path, labels: np.ndarray, threads: int) -> dict:
    """name -> zero-argument callable generating one batch of token grids."""
    gen = fullvq_rt.Generator(engine, device="cpu", num_threads=threads)
    tlabels = torch.from_numpy(labels)
    out = {"fullvq_rt Generator": lambda: gen.sample_tokens(labels, cfg=CFG, top_k=TOP_K, seed=0),
           "PyTorch eager": lambda: generate(model, tlabels, cfg_scale=CFG, top_k=TOP_K, seed=0)}
    try:
        compiled = copy.copy(model)  # the same weights; generate() calls its prefill and decode
        compiled.prefill, compiled.decode = torch.compile(model.prefill), torch.compile(model.decode)
        generate(compiled, tlabels, cfg_scale=CFG, top_k=TOP_K, seed=0)  # compiles, or raises here
        out["PyTorch torch.compile"] = lambda: generate(compiled, tlabels, cfg_scale=CFG, top_k=TOP_K, seed=0)
    except Exception as e:  # inductor needs a working C++ toolchain; report instead of failing
        print(f"torch.compile unavailable: {e.__class__.__name__}: {str(e).splitlines()[0][:120]}")
    return out


def sampler_share(preset_name: str, vocab: int, batch: int, repeats: int, threads: int) -> dict:
    """ms of one PyTorch decode step and of the C++ sampler on its logits, batch `batch` with CFG."""
    grid = GRIDS[preset_name]
    model, _ = random_gpt(preset_name, vocab, grid)
    rows, cfg = 2 * batch, gpt_preset(preset_name).model
    shape = (cfg.n_layer, rows, cfg.n_head, grid[0] * grid[1], cfg.dim // cfg.n_head)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    token, pos = torch.zeros(rows, dtype=torch.long), torch.tensor([grid[0] * grid[1] // 2])
    with torch.no_grad():
        step_s, _ = measure(lambda: model.decode(token, pos, k_cache, v_cache), repeats)
        logits = model.decode(token, pos, k_cache, v_cache)[0].numpy()
    sampler_s, _ = measure(lambda: sample_logits(logits, cfg_scale=CFG, top_k=TOP_K, seed=0, num_threads=threads),
                           repeats)
    return dict(preset=preset_name, vocab=vocab, batch=batch, decode_ms=step_s * 1e3, sampler_ms=sampler_s * 1e3,
                share=sampler_s / step_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,B")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampler-vocab", type=int, default=262144, help="0 skips the sampler-share table")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}, {args.threads} threads on every side, torch {torch.__version__}, "
          f"CFG {CFG}, top-k {TOP_K}, vocabulary {VOCAB}\n")
    print("| preset | batch | loop | median s per batch | tokens/s | x PyTorch eager |")
    print("|---|---:|---|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            engine, model = bundle_for(name, folder)
            tokens = GRIDS[name][0] * GRIDS[name][1]
            for batch in (int(b) for b in args.batches.split(",")):
                labels = np.arange(batch, dtype=np.int64) % 1000
                times = {loop: measure(fn, args.repeats)[0] for loop, fn in loops(model, engine, labels, args.threads).items()}
                for loop, seconds in times.items():
                    row = dict(preset=name, batch=batch, loop=loop, seconds=seconds, tokens_per_s=batch * tokens / seconds,
                               speedup=times["PyTorch eager"] / seconds)
                    rows.append(row)
                    print(f"| {name} | {batch} | {loop} | {seconds:.3f} | {row['tokens_per_s']:.0f} | "
                          f"{row['speedup']:.2f} |", flush=True)
    share = sampler_share("B", args.sampler_vocab, 8, args.repeats, args.threads) if args.sampler_vocab else None
    if share:
        print("\n| preset | vocabulary | batch (CFG rows) | PyTorch decode step ms | C++ sampler ms | sampler share |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| B | {share['vocab']} | 8 (16) | {share['decode_ms']:.1f} | {share['sampler_ms']:.2f} | "
              f"{share['share']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(dict(cpu=cpu_model(), threads=args.threads, rows=rows, sampler=share), indent=1))


if __name__ == "__main__":
    main()
