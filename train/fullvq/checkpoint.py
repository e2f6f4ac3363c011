"""ckpt.pt: config (plain dict), model weights, optimiser state, step and RNG state.

Written atomically (temporary file + rename), read with torch.load(weights_only=True), and
enough on its own to rebuild the model: a tokenizer (train/fvq.py) with `load_model`, a generator
(train/gpt.py, marked "kind": "gpt") with `load_gpt`.

Crash safety: a kill at any moment, inside a write included, leaves the last complete checkpoint;
`prepare_run_folder` checks the run folder before any work and removes the temporary files of killed
writes; a write that fails (a full disk, a file size limit) says what failed and leaves the previous
checkpoint as it was; `truncate_log` drops a log line cut short. docs/training.md, "Crash safety".

Version 2 names bridges as FVQ does. A version-1 tokenizer checkpoint (fullvq 0.1, whose XS..XL
were its own sizes with LayerNorm eps 1e-5) is read with its bridge spelled out ("XS/8" becomes
"W128-H2-D2/8", eps 1e-5), so it rebuilds the network it was trained as.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .config import Config
from .gpt_config import GPTConfig
from .io import atomic_save, atomic_write_text
from .quantizers.bridge import LEGACY_LN_EPS, legacy_bridge_name

FORMAT = "fullvq-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
GPT_KIND = "gpt"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the message says why, what is left and what to do)."""


def save(path: str | Path, state: dict) -> None:
    """Writes {format, version, **state} to `path` atomically. A write that fails for want of space (or
    any other OSError) raises CheckpointWriteError, with `path` left as it was."""
    path = Path(path)
    try:
        atomic_save({"format": FORMAT, "version": VERSION, **state}, path)
    except (OSError, RuntimeError) as e:  # torch.save: a failed write() is a RuntimeError, the OSError its context
        cause = next((c for c in _chain(e) if isinstance(c, OSError)), None)
        if cause is None:
            raise
        raise CheckpointWriteError(_write_failure(path, state, cause)) from cause
    _sync_folder(path.parent)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _write_failure(path: Path, state: dict, cause: OSError) -> str:
    """What failed, how much room there was, what is left and what to do."""
    need = sum(t.numel() * t.element_size() for t in _tensors(state))
    room = []
    try:
        room.append(f"the file system of {str(path.parent)!r} has {_mib(shutil.disk_usage(path.parent).free)} free")
    except OSError:
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            room.append(f"this process may write files of at most {_mib(limit)} (ulimit -f)")
    except (ImportError, OSError, ValueError):
        pass
    kept = (f"{str(path)!r} still holds the previous checkpoint: make room (or raise the limit) and continue the run "
            f"with --resume (train/study.py: run the same command again), or move the run folder to a disk with room"
            if path.is_file() else
            "no earlier checkpoint exists: make room, or pass --out on a disk with room, and start again")
    return (f"cannot write the checkpoint {str(path)!r}: {cause.strerror or cause}. It needs about {_mib(need)} of "
            f"tensors; {', and '.join(room) or 'the free space is unknown'}. {kept}")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it outlives a power cut (where the system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_run_folder(ckpt_path: str | Path) -> None:
    """Before any work: creates the checkpoint's folder (the run's --out) and proves that a file can be
    written there, else an OSError that says so; then removes the temporary files that killed writes
    left there (of the checkpoint, the log, metrics.json and result.json)."""
    folder = Path(ckpt_path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise type(e)(f"cannot write to the run folder --out {str(folder)!r}: {e.strerror or e}"
                      f"{f' ({e.filename!r})' if e.filename and str(e.filename) != str(folder) else ''}. "
                      f"Pass an --out you can write to (nothing was trained)") from None
    for name in (Path(ckpt_path).name, "log.jsonl", "metrics.json", "result.json", "write-test"):
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def truncate_log(path: str | Path, step: int) -> None:
    """Keeps the JSON lines of a training log up to `step` (all of a resumed run's checkpointed past,
    none of a new run), rewritten atomically. A line cut short (a kill or a full disk during its
    write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(entry, dict) and entry.get("step", step + 1) <= step:
            kept.append(line + "\n")
    if torn:
        print(f"{path}: dropped {torn} incomplete line(s), cut short by an interrupted write", file=sys.stderr)
    atomic_write_text(path, "".join(kept))


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
