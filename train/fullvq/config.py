"""Training configuration: plain dataclasses, presets, and `key=value` overrides.

A run's whole configuration is one `Config`; checkpoints store it as a plain dict (`asdict`) and
`Config.from_dict` rebuilds it, so a checkpoint alone is enough to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

QUANTIZERS = ("vq", "ema", "fc", "lc", "simvq", "bridge")


@dataclass
class ModelConfig:
    """The LlamaGen/taming VQ CNN (fullvq.models.autoencoder)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    norm_groups: int = 32
    dropout: float = 0.0


@dataclass
class QuantizerConfig:
    """Which quantizer, and its codebook. `bridge` names a VQBridge config in FVQ's names ("L/8",
    "B/4-d4"), a spelled-out shape ("W128-H4-D2/16") or "auto" (FVQ's choice for K: L/4 up to
    16,384 codes, L/8 beyond); see fullvq.quantizers.bridge."""

    name: str = "bridge"
    codebook_size: int = 16384
    codebook_dim: int = 8
    beta: float = 0.25               # commitment weight
    l2_norm: bool = False            # l2-normalise latents and codes, match by cosine (fc always does)
    entropy_weight: float = 0.0      # skipped entirely at 0
    entropy_temperature: float = 0.01
    ema_decay: float = 0.99          # ema quantizer
    bridge: str = "auto"
    bridge_kind: str = "vit"         # "vit": FVQ's ViT bridge (the paper's); "dit": the DiT bridge its scripts train
    bridge_init: str = "fullvq"      # "fvq": FVQ's (raw codes uniform in +-1/K, xavier layers); "fullvq": N(0, 1) codes
    bridge_head_init_std: float = 1e-3  # 0 = FVQ's exact zero start of the last layer (ties every code at step 0)
    bridge_ln_eps: float = 1e-6      # FVQ's; checkpoints of fullvq 0.1 (PyTorch's default 1e-5) keep theirs
    bridge_lr_scale: float = 1.0     # the bridge network's lr as a multiple of the autoencoder's (FVQ: 1)
    bridge_raw_lr_scale: float = 1.0  # the raw codes' lr as a multiple of the autoencoder's (FVQ: 1)
    lc_codebook: str = ""            # lc: file from train/build_lc_codebook.py
    lc_feature_dim: int = 0          # lc: filled in from that file
    residual_depth: int = 1          # > 1 wraps the quantizer in residual VQ


@dataclass
class LossConfig:
    pixel: str = "l2"                # "l2" or "l1"
    pixel_weight: float = 1.0
    perceptual_weight: float = 0.0   # LPIPS (VGG)
    disc_weight: float = 0.0         # PatchGAN hinge; 0 switches the discriminator off
    disc_start: int = 0              # generator step from which the adversarial loss is used
    disc_lr: float = 1e-4            # peak; follows the generator's schedule and batch scaling


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # data
    data: str = ""                   # folder of images; "" = the photos that ship in pip packages
    train_crops: str = "split"       # "split": crops of each image's left 3/4 (its right 1/4 is held out);
                                     # "resize": LlamaGen/FVQ's random_crop_arr + flip over whole images
    val_data: str = ""               # held-out folder for the final evaluation ("" = the split's held-out tiles)
    val_crop: str = "center"         # of val_data: "center" (FVQ's: no resize), "resize" (short side first), "tiles"
    image_size: int = 32
    batch_size: int = 32             # per process
    global_batch_size: int = 0       # > 0: split over the processes, replacing batch_size
    num_workers: int = 0
    # optimisation
    steps: int = 3000
    epochs: int = 0                  # > 0: steps = epochs x (images // global batch), replacing steps
    lr: float = 1e-3
    lr_base_batch: int = 0           # > 0: the peak lr is lr x global batch / lr_base_batch (FVQ: 128)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    schedule: str = "anneal"         # "anneal" (FVQ's learning annealing), "fvq" (its script's 'lin'), "cosine",
                                     # "constant"
    warmup: float = 0.05             # fractions of `steps`
    decay_start: float = 0.5         # ("fvq": of the steps after warm-up, FVQ's lrT)
    final_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.0           # > 0 keeps an EMA of the weights, used by evaluation and export
    # run
    out: str = "runs/fvq"
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    eval_tokens_per_code: int = 50   # usage_train over fresh training crops with this many tokens per code
    eval_crops: int = 0              # or exactly this many crops (tests)
    bf16: bool = True                # autocast on GPU (distances stay fp32)

    @staticmethod
    def from_dict(d: dict) -> Config:
        return _from_dict(Config, d)


def _tiny() -> Config:
    """About 0.4M parameters, f = 4 (8x8 tokens per 32 px crop): 3000 steps in minutes on 2 cores."""
    return Config(
        preset="tiny",
        model=ModelConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, norm_groups=8),
        quantizer=QuantizerConfig(bridge="B/8"),  # FVQ's B/8: as wide as fullvq 0.1's XS/8, at the same cost
    )


def _vq16() -> Config:
    return Config(
        preset="vq16", image_size=256, batch_size=128, steps=400_000, lr=1e-4, weight_decay=0.05, ema_decay=0.9999,
        model=ModelConfig(),
        loss=LossConfig(perceptual_weight=1.0, disc_weight=0.5, disc_start=20_000),
        log_every=100, ckpt_every=5000,
    )


def _fvq() -> Config:
    """FVQ's ImageNet recipe: scripts/recon/FVQ-{16384,65536,262144}.sh running
    tokenizer/tokenizer_image/vq_train_qbridge_lr.py (docs/training.md names the source of each value).

    LlamaGen VQ-16 with 256-dimensional codes, no l2 normalisation; the bridge FVQ's scripts train
    (the DiT bridge of qbridge.py, --is_uncondition: one learned condition) of the size they pick for
    K (L/4 at 16,384 codes, L/8 at 65,536 and 262,144), with FVQ's initialisation and a zero last layer;
    Adam (0.9, 0.95) without weight decay at 1e-4 x global batch / 128, global batch 128, 40 epochs,
    gradients clipped at 1 (generator and discriminator); its 'lin' schedule (4 warm-up epochs from
    0.5% of the peak, hold for 30% of the rest, linear decay to 1%) for both optimisers; L2 pixel +
    LPIPS + 0.5 PatchGAN hinge from step 20,000 (FVQ counts steps from 1) + codebook + 0.25 commitment;
    no EMA; random_crop_arr + flip of whole training images, centre crops of --val-data.
    """
    return Config(
        preset="fvq", image_size=256, global_batch_size=128, batch_size=128, epochs=40, lr=1e-4, lr_base_batch=128,
        weight_decay=0.0, schedule="fvq", warmup=0.1, decay_start=0.3, final_lr_ratio=0.01, grad_clip=1.0,
        train_crops="resize", val_crop="center", num_workers=8,
        model=ModelConfig(),
        quantizer=QuantizerConfig(codebook_dim=256, bridge="auto", bridge_kind="dit", bridge_init="fvq",
                                  bridge_head_init_std=0.0),
        loss=LossConfig(perceptual_weight=1.0, disc_weight=0.5, disc_start=19_999, disc_lr=1e-4),
        log_every=100, ckpt_every=10_000,
    )


PRESETS = {"tiny": _tiny, "vq16": _vq16, "fvq": _fvq}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _from_dict(cls, d: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = _from_dict(hints[f.name], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}: was this file written by another "
                         f"version of fullvq?")
    return cls(**kwargs)


def _parse_value(text: str, kind, key: str):
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if origin is tuple:
            item = typing.get_args(kind)[0]
            return tuple(item(v) for v in text.strip("()[]").split(",") if v.strip())
        return kind(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected {getattr(kind, '__name__', kind)}") from None


def apply_override(cfg: Config, assignment: str) -> None:
    """Applies one `key=value` (dotted keys reach nested sections: `loss.perceptual_weight=1`)."""
    if "=" not in assignment:
        raise ValueError(f"expected key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    *path, name = key.strip().split(".")
    target = cfg
    for part in path:
        if not dataclasses.is_dataclass(getattr(target, part, None)):
            raise ValueError(f"unknown config section {part!r} in {key!r}; sections: "
                             f"{[f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]}")
        target = getattr(target, part)
    hints = typing.get_type_hints(type(target))
    if name not in hints or dataclasses.is_dataclass(hints[name]):
        valid = sorted(n for n, h in hints.items() if not dataclasses.is_dataclass(h))
        raise ValueError(f"unknown config key {key!r}; valid keys here: {valid}")
    setattr(target, name, _parse_value(text.strip(), hints[name], key))
