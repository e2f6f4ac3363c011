"""The quantizer family (one module each) and the factory that builds one from a config."""

from __future__ import annotations

from ..config import QuantizerConfig
from .base import QuantOut, Quantizer
from .bridge import BridgeQuantizer, VQBridge
from .ema import EMAVQ
from .fc import FactorizedVQ
from .lc import LCQuantizer, load_lc_codebook
from .residual import ResidualQuantizer
from .simvq import SimVQ
from .vq import VQ

__all__ = ["QuantOut", "Quantizer", "VQBridge", "build_quantizer"]


def _build_one(cfg: QuantizerConfig, centres=None):
    common = dict(beta=cfg.beta, entropy_weight=cfg.entropy_weight, entropy_temperature=cfg.entropy_temperature,
                  l2_norm=cfg.l2_norm)
    k, d = cfg.codebook_size, cfg.codebook_dim
    if cfg.name == "vq":
        return VQ(k, d, **common)
    if cfg.name == "fc":
        return FactorizedVQ(k, d, **common)
    if cfg.name == "ema":
        return EMAVQ(k, d, decay=cfg.ema_decay, **common)
    if cfg.name == "simvq":
        return SimVQ(k, d, **common)
    if cfg.name == "bridge":
        return BridgeQuantizer(k, d, cfg.bridge, cfg.bridge_head_init_std, cfg.bridge_init, cfg.bridge_ln_eps,
                               cfg.bridge_kind, **common)
    if cfg.name == "lc":
        return LCQuantizer(k, d, cfg.lc_feature_dim, centres, **common)
    raise ValueError(f"unknown quantizer {cfg.name!r}: expected one of vq, ema, fc, lc, simvq, bridge")


def build_quantizer(cfg: QuantizerConfig, from_checkpoint: bool = False):
    """A quantizer for `cfg`. For `lc`, the frozen centres are read from cfg.lc_codebook (and
    cfg.lc_feature_dim is filled in) unless the weights will come from a checkpoint."""
    centres = None
    if cfg.name == "lc" and not from_checkpoint:
        centres = load_lc_codebook(cfg.lc_codebook, cfg.codebook_size)
        cfg.lc_feature_dim = centres.shape[1]
    if cfg.residual_depth > 1:
        return ResidualQuantizer([_build_one(cfg, centres) for _ in range(cfg.residual_depth)])
    return _build_one(cfg, centres)
