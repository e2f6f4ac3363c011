"""Autoencoder networks, the factory that builds a whole tokenizer from a Config, and the generator GPT."""

from __future__ import annotations

from ..config import Config
from ..quantizers import build_quantizer
from .autoencoder import Decoder, Encoder, VQModel
from .gpt import GPT

__all__ = ["GPT", "Decoder", "Encoder", "VQModel", "build_model"]


def build_model(cfg: Config, from_checkpoint: bool = False) -> VQModel:
    """Encoder + quantizer + decoder for `cfg` (the quantizer's weights from a checkpoint if so)."""
    m = cfg.model
    shape = dict(ch=m.ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks, z_channels=m.z_channels,
                 dropout=m.dropout, norm_groups=m.norm_groups)
    return VQModel(Encoder(**shape), Decoder(**shape), build_quantizer(cfg.quantizer, from_checkpoint),
                   cfg.quantizer.codebook_dim)
