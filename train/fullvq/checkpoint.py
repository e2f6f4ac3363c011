"""ckpt.pt: config (plain dict), model weights, optimiser state, step and RNG state.

Written atomically (temporary file + rename), read with torch.load(weights_only=True), and
enough on its own to rebuild the model: a tokenizer (train/fvq.py) with `load_model`, a generator
(train/gpt.py, marked "kind": "gpt") with `load_gpt`.

Version 2 names bridges as FVQ does. A version-1 tokenizer checkpoint (fullvq 0.1, whose XS..XL
were its own sizes with LayerNorm eps 1e-5) is read with its bridge spelled out ("XS/8" becomes
"W128-H2-D2/8", eps 1e-5), so it rebuilds the network it was trained as.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Config
from .gpt_config import GPTConfig
from .io import atomic_save
from .quantizers.bridge import LEGACY_LN_EPS, legacy_bridge_name

FORMAT = "fullvq-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
GPT_KIND = "gpt"


def save(path: str | Path, state: dict) -> None:
    """Writes {format, version, **state} to `path` atomically."""
    atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict, after checking that it is a fullvq checkpoint of this version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {e}. Is the file complete?") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a fullvq checkpoint: for published LlamaGen or FVQ weights, pass "
                         f"--from llamagen or --from fvq (or convert them once with train/convert.py)")
    if state.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{str(path)!r} is a version {state.get('version')} fullvq checkpoint; this fullvq "
                         f"reads versions {list(READABLE_VERSIONS)}: use the fullvq release that wrote it")
    if state["version"] == 1 and state.get("kind") != GPT_KIND:
        state["config"] = upgrade_v1_config(state["config"])
    return state


def upgrade_v1_config(config: dict) -> dict:
    """A version-1 tokenizer config with its bridge as it was trained: fullvq 0.1's size names spelled
    out, LayerNorm eps 1e-5."""
    quantizer = dict(config["quantizer"])
    quantizer["bridge"] = legacy_bridge_name(quantizer["bridge"])
    quantizer["bridge_ln_eps"] = LEGACY_LN_EPS
    return {**config, "quantizer": quantizer}


def state_of(ckpt: str | Path | dict) -> dict:
    """The checkpoint dict of `ckpt`: a path (loaded with `load`), or a dict already loaded or
    converted (fullvq.interop)."""
    return ckpt if isinstance(ckpt, dict) else load(ckpt)


def load_model(path: str | Path, map_location: str | torch.device = "cpu", ema: bool = True):
    """(model, config) rebuilt from the checkpoint alone, in eval mode: the EMA of the weights when
    the run kept one (and `ema`), else the trained weights."""
    return model_from_state(load(path, map_location), ema)


def model_from_state(state: dict, ema: bool = True):
    """(model, config) from a loaded checkpoint dict (see load_model)."""
    from .models import build_model

    if state.get("kind") == GPT_KIND:
        raise ValueError("this is a generator checkpoint (train/gpt.py), not a tokenizer: load it with "
                         "fullvq.checkpoint.load_gpt, or pass the tokenizer checkpoint (train/fvq.py) instead")
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg, from_checkpoint=True)
    if ema and "ema" in state:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items()
                               if k.startswith("module.")})
    else:
        model.load_state_dict(state["model"])
    return model.eval(), cfg


def require_gpt(state: dict, path: str | Path) -> dict:
    """`state` (a loaded checkpoint dict) when it is a generator's; a ValueError saying what it is otherwise."""
    if state.get("kind") != GPT_KIND:
        raise ValueError(f"{str(path)!r} is a tokenizer checkpoint (train/fvq.py), not a generator: load it with "
                         f"fullvq.checkpoint.load_model, or pass a checkpoint written by train/gpt.py")
    return state


def load_gpt(path: str | Path, map_location: str | torch.device = "cpu"):
    """(GPT in eval mode, GPTConfig) rebuilt from a generator checkpoint (train/gpt.py) alone."""
    from .models.gpt import GPT

    state = require_gpt(load(path, map_location), path)
    cfg = GPTConfig.from_dict(state["config"])
    model = GPT(cfg.model, cfg.vocab_size, cfg.grid, cfg.num_classes)
    model.load_state_dict(state["model"])
    return model.eval(), cfg
