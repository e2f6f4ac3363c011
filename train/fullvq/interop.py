"""Published LlamaGen and FVQ tokenizer checkpoints as ordinary fullvq checkpoints.

    state = convert("vq_ds16_c2i.pt", "llamagen")     # a fullvq checkpoint dict, ready for
    checkpoint.save("runs/llamagen/ckpt.pt", state)   # export, evaluation or --resume

- ``llamagen``: a LlamaGen ``VQModel`` state dict (FVQ releases its models in this "VQGAN format"
  too), under ``"ema"``, ``"model"`` or ``"state_dict"`` (in that order, as LlamaGen's own scripts
  look) or at the top level. Its keys are fullvq's ``VQModel`` keys with a plain ``vq`` quantizer,
  one for one; LlamaGen's ``quantize.codebook_used`` usage buffer is dropped. ch, ch_mult,
  num_res_blocks, z_channels and the codebook's size and dim are read off the tensor shapes;
  GroupNorm has 32 groups, as LlamaGen fixes it.
- ``fvq``: the same, plus FVQ's bridge under ``quantize.qbridge.`` with the raw codebook in
  ``quantize.embedding.weight``: the ViT bridge of ``qbridge_ViT.py`` (FVQ_VIT_KEYS) or the DiT bridge
  of ``qbridge.py`` that FVQ's training scripts use (FVQ_DIT_KEYS too). The bridge runs once, in
  float64, with FVQ's arithmetic (4 heads unless told otherwise, LayerNorm eps 1e-6); its output
  becomes the codebook and its keys are dropped. Files saved by FVQ's trainers ({"model", "ema",
  "optimizer", ..., "args"}) name their bridge in args.QB_type, which is checked against the shapes.
- Metric: LlamaGen's quantizer l2-normalises latents and codes (cosine); converted FVQ models may
  not. Cosine when every codebook row has unit norm, else l2, unless `metric` says.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from . import checkpoint
from .config import ModelConfig, QuantizerConfig, preset
from .quantizers.bridge import FVQ_HEADS, VQBridge, parse_bridge

SOURCES = ("fullvq", "llamagen", "fvq")
METRICS = ("l2", "cosine")
DROPPED = ("quantize.codebook_used",)  # LlamaGen's rolling usage counter, not a weight
BRIDGE_PREFIX = "quantize.qbridge."
UNIT_NORM_TOL = 1e-3
LLAMAGEN_NORM_GROUPS = 32
LLAMAGEN_IMAGE_SIZE = 256

# FVQ's ViT bridge (qbridge_ViT.py's VQBridge) -> fullvq's VQBridge, per block i; its LayerNorms have no
# weights. The DiT bridge (qbridge.py) has these too, plus FVQ_DIT_KEYS and a stored pos_embed.
FVQ_VIT_KEYS = {
    "x_embedder.proj": "patch_embed",
    "blocks.{i}.attn.qkv": "blocks.{i}.qkv",
    "blocks.{i}.attn.proj": "blocks.{i}.proj",
    "blocks.{i}.mlp.fc1": "blocks.{i}.mlp.0",
    "blocks.{i}.mlp.fc2": "blocks.{i}.mlp.2",
    "final_layer.linear": "head",
}
FVQ_DIT_KEYS = {
    "y_embedder.embedding_table": "condition",  # the weight alone, its row 0
    "blocks.{i}.adaLN_modulation.1": "blocks.{i}.modulation",
    "final_layer.adaLN_modulation.1": "final_modulation",
}


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state dict with floating tensors in float32 and any "module." prefix removed, where in the
    file it was found, the training arguments saved beside it as a dict ({} when none))."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:  # LlamaGen's checkpoints also hold their argparse arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[-1][:300]
        raise ValueError(f"cannot read {str(path)!r} as a PyTorch checkpoint ({reason}). Is the file complete? Only "
                         f"tensors, plain containers and argparse.Namespace are unpickled") from None
    if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT:
        raise ValueError(f"{str(path)!r} is already a fullvq checkpoint: leave out --from")
    where, weights = "top level", obj
    for key in ("ema", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            where, weights = f"'{key}'", obj[key]
            break
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{str(path)!r} holds no state dict of tensors under 'ema', 'model', 'state_dict' or at the "
                         f"top level (found {found})")
    args = vars(obj["args"]) if isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace) else {}
    sd = {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return sd, where, args


def _shape(sd: dict, key: str) -> torch.Size:
    if key not in sd:
        raise ValueError(f"missing {key!r}: this is not a LlamaGen VQModel state dict (it has e.g. "
                         f"{sorted(sd)[:4]})")
    return sd[key].shape


def _count(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix` has (prefix "a.b." and keys "a.b.0.x", "a.b.1.y" -> 2)."""
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def infer_model_config(sd: dict) -> ModelConfig:
    """The autoencoder's shape, read off a LlamaGen VQModel state dict's tensor shapes."""
    ch, in_channels = _shape(sd, "encoder.conv_in.weight")[:2]
    if in_channels != 3:
        raise ValueError(f"encoder.conv_in takes {in_channels} channels; fullvq tokenizes RGB images (3)")
    z_channels = _shape(sd, "quant_conv.weight")[1]
    _shape(sd, "encoder.conv_blocks.0.res.0.conv1.weight")
    levels = _count(sd, "encoder.conv_blocks.")
    widths = [_shape(sd, f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in range(levels)]
    decoder_widths = [_shape(sd, f"decoder.conv_blocks.{j}.res.0.conv1.weight")[0] for j in range(levels)][::-1]
    if any(w % ch for w in widths) or widths != decoder_widths:
        raise ValueError(f"level widths: encoder {widths}, decoder {decoder_widths}, for ch={ch}; fullvq builds "
                         f"encoder and decoder with one ch_mult (multiples of ch), as LlamaGen's VQ-8 and VQ-16 do")
    num_res_blocks = _count(sd, "encoder.conv_blocks.0.res.")
    decoder_res = _count(sd, "decoder.conv_blocks.0.res.")
    if decoder_res != num_res_blocks + 1:
        raise ValueError(f"the decoder has {decoder_res} res blocks per level, the encoder {num_res_blocks}; "
                         f"LlamaGen's layout has one more in the decoder")
    return ModelConfig(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=num_res_blocks,
                       z_channels=z_channels, norm_groups=LLAMAGEN_NORM_GROUPS, dropout=0.0)


def detect_metric(codebook: torch.Tensor, override: str | None = None) -> tuple[str, str]:
    """(metric, why): cosine when every row of the (K, D) codebook has unit norm, else l2."""
    norms = codebook.norm(dim=1)
    unit = bool(((norms - 1).abs() <= UNIT_NORM_TOL).all())
    if override is not None:
        if override not in METRICS:
            raise ValueError(f"unknown metric {override!r}: expected one of {list(METRICS)}")
        return override, f"--metric {override} (codebook rows {'are' if unit else 'are not all'} of unit norm)"
    if unit:
        return "cosine", "every codebook row has unit norm"
    return "l2", (f"codebook row norms range {float(norms.min()):.3g}..{float(norms.max()):.3g}; a model trained "
                  f"with codebook_l2_norm (LlamaGen's default) needs --metric cosine")


def _bridge_kind(keys: set[str], dit: bool) -> str:
    if keys & {"linear.weight", "linear_5.0.weight"}:
        return "one of FVQ's linear bridges (Qbridge-lin/1 or lin/5)"
    if any("clip" in k.lower() or "siglip" in k.lower() for k in keys):
        return "a CLIP/SigLIP bridge"
    return "a DiT bridge (adaLN-modulated blocks) of another layout" if dit else "an unrecognised bridge"


def bake_fvq_bridge(sd: dict, heads: int | None = None, qb_type: str | None = None) -> tuple[torch.Tensor, dict]:
    """(codebook (K, D) = bridge(raw codebook), what was read) from an FVQ-format state dict.

    Either of FVQ's bridges, loaded into fullvq's VQBridge of the same kind: the ViT one
    (FVQ_VIT_KEYS) or the DiT one (FVQ_DIT_KEYS too; its condition is label 0's embedding, as FVQ's
    inference passes no label, and its pos_embed is used as stored). `qb_type` is the name FVQ's
    training arguments give (e.g. "QBridge-L/8"), checked against the tensor shapes; `heads`
    overrides the attention heads (default: 4, as in every FVQ config). Computed in float64.
    """
    raw = sd["quantize.embedding.weight"]
    bridge = {k[len(BRIDGE_PREFIX):]: v for k, v in sd.items() if k.startswith(BRIDGE_PREFIX)}
    dit = any("adaLN_modulation" in k for k in bridge)
    depth = _count(bridge, "blocks.")
    names = {**FVQ_VIT_KEYS, **(FVQ_DIT_KEYS if dit else {})}
    expected = {f"{fvq.format(i=i)}.{p}": f"{ours.format(i=i)}.{p}" for fvq, ours in names.items()
                for i in range(depth if "{i}" in fvq else 1) for p in ("weight", "bias")}
    if dit:
        del expected["y_embedder.embedding_table.bias"]
        expected.update({"y_embedder.embedding_table.weight": "condition", "pos_embed": "pos_embed"})
    unknown, missing = sorted(set(bridge) - set(expected)), sorted(set(expected) - set(bridge))
    if unknown or missing:
        raise ValueError(f"--from fvq reads FVQ's ViT bridge (quantize.qbridge.{{x_embedder.proj, blocks.N.attn.qkv/"
                         f"proj, blocks.N.mlp.fc1/fc2, final_layer.linear}}) and its DiT bridge (those, pos_embed, "
                         f"y_embedder and adaLN_modulation); this checkpoint holds {_bridge_kind(set(bridge), dit)}: "
                         f"unknown keys {unknown[:8]}, missing keys {missing[:8]}")
    width, dim, patch, _ = bridge["x_embedder.proj.weight"].shape
    mlp_width = bridge["blocks.0.mlp.fc1.weight"].shape[0] if depth else 2 * width
    name = _check_qb_type(qb_type, width, depth, patch, mlp_width) if qb_type else None
    heads = heads or FVQ_HEADS
    try:
        module = VQBridge(raw.shape[0], dim, width, depth, heads, patch, mlp_width=mlp_width,
                          kind="dit" if dit else "vit").double()
        weights = {ours: bridge[fvq].double() for fvq, ours in expected.items()}
        if dit:  # FVQ's inference embeds label 0 (no label given, no dropout)
            weights["condition"] = weights["condition"][:1]
        module.load_state_dict(weights)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"the FVQ bridge's tensors do not fit a {'DiT' if dit else 'ViT'} bridge of width {width}, "
                         f"depth {depth}, patch {patch}, {heads} heads: {e}") from None
    with torch.no_grad():
        codebook = module.eval()(raw.double()).float()
    read = {"kind": "DiT" if dit else "ViT", "name": name, "width": width, "depth": depth, "heads": heads,
            "patch": patch, "mlp_width": mlp_width}
    if dit:
        read["condition"] = f"label 0 of {len(bridge['y_embedder.embedding_table.weight'])} label embeddings"
    return codebook, read


def _check_qb_type(qb_type: str, width: int, depth: int, patch: int, mlp_width: int) -> str:
    """FVQ's QB_type argument, after checking that it names the shapes the tensors have."""
    try:
        named = parse_bridge(qb_type)
    except ValueError:
        raise ValueError(f"the checkpoint's arguments name the bridge {qb_type!r}, which is not one of FVQ's ViT/DiT "
                         f"bridges (SIZE/PATCH[-dDEPTH])") from None
    if (named.width, named.depth, named.patch, 2 * named.width) != (width, depth, patch, mlp_width):
        raise ValueError(f"the checkpoint's arguments name {qb_type!r} (width {named.width}, depth {named.depth}, "
                         f"patch {named.patch}), but its bridge tensors have width {width}, depth {depth}, patch "
                         f"{patch}, MLP {mlp_width}: the file is inconsistent")
    return qb_type


def _check_keys(expected: dict[str, torch.Tensor], sd: dict) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if expected[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {what}: {keys[:10]}{' ...' if len(keys) > 10 else ''}"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("keys of another shape", wrong)) if keys]
        raise ValueError("the file does not match LlamaGen's VQModel layout: " + "; ".join(parts))


def convert(path: str | Path, source: str, metric: str | None = None, bridge_heads: int | None = None,
            image_size: int = LLAMAGEN_IMAGE_SIZE) -> dict:
    """A fullvq checkpoint dict (config, model, step 0, converted_from) of a LlamaGen or FVQ file.

    The config is the vq16 (LlamaGen) or fvq (FVQ) training recipe with the file's architecture and
    a plain `vq` quantizer holding the (baked) codebook, so that train/fvq.py --resume fine-tunes it;
    image_size is the size the model is meant for (LlamaGen's and FVQ's: 256).
    """
    from .models import build_model

    if source not in SOURCES[1:]:
        raise ValueError(f"unknown checkpoint format {source!r}: expected one of {list(SOURCES[1:])}")
    sd, where, args = read_weights(path)
    has_bridge = any(k.startswith(BRIDGE_PREFIX) for k in sd)
    if has_bridge and source == "llamagen":
        raise ValueError(f"{str(path)!r} holds an FVQ bridge (quantize.qbridge.*): convert it with --from fvq")
    origin = {"format": source, "path": str(path), "weights": where, "dropped": [k for k in DROPPED if k in sd]}
    if has_bridge:
        _shape(sd, "quantize.embedding.weight")
        codebook, origin["bridge"] = bake_fvq_bridge(sd, bridge_heads, args.get("QB_type"))
        origin["dropped"] += sorted(k for k in sd if k.startswith(BRIDGE_PREFIX))
        sd = {**sd, "quantize.embedding.weight": codebook}
    elif bridge_heads is not None:
        raise ValueError("--bridge-heads applies to FVQ files that hold a bridge; this one has none")
    sd = {k: v for k, v in sd.items() if k not in origin["dropped"]}
    model_cfg = infer_model_config(sd)
    size, dim = _shape(sd, "quantize.embedding.weight")
    origin["metric"], origin["metric_reason"] = detect_metric(sd["quantize.embedding.weight"], metric)
    cfg = preset("fvq" if source == "fvq" else "vq16")
    cfg.model, cfg.image_size = model_cfg, image_size
    cfg.quantizer = QuantizerConfig(name="vq", codebook_size=size, codebook_dim=dim,
                                    l2_norm=origin["metric"] == "cosine")
    model = build_model(cfg, from_checkpoint=True)
    _check_keys(model.state_dict(), sd)
    model.load_state_dict(sd)
    return {"config": asdict(cfg), "model": model.state_dict(), "step": 0, "converted_from": origin}


def read_checkpoint(path: str | Path, source: str = "fullvq", metric: str | None = None,
                    bridge_heads: int | None = None) -> str | dict:
    """What export and evaluation take (see checkpoint.state_of): `path` itself for a fullvq
    checkpoint, the converted checkpoint dict for a published one (see convert)."""
    if source != "fullvq":
        return convert(path, source, metric, bridge_heads)
    if metric is not None or bridge_heads is not None:
        raise ValueError("--metric and --bridge-heads apply to converted checkpoints (--from llamagen or fvq)")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--from, --metric and --bridge-heads, for every command that reads a tokenizer checkpoint."""
    group = parser.add_argument_group("published checkpoints")
    group.add_argument("--from", dest="source", choices=SOURCES, default="fullvq",
                       help="CKPT's format: fullvq (default), llamagen (LlamaGen VQModel / FVQ's VQGAN-format "
                            "release) or fvq (FVQ with its ViT or DiT VQBridge, baked here)")
    group.add_argument("--metric", choices=METRICS, help="codebook metric of a converted checkpoint (default: cosine "
                                                         "when every code has unit norm, else l2)")
    group.add_argument("--bridge-heads", type=int, metavar="N", help="attention heads of an FVQ bridge (default: "
                                                                     "4, as in every FVQ config)")


def from_arguments(args: argparse.Namespace) -> str | dict:
    """read_checkpoint for the parsed add_arguments flags and a positional `checkpoint`."""
    return read_checkpoint(args.checkpoint, args.source, args.metric, args.bridge_heads)


def describe(state: dict) -> str:
    """One line on what a conversion (convert's result) read and chose."""
    origin = state["converted_from"]
    cfg, bridge = state["config"], origin.get("bridge")
    baked = ""
    if bridge:
        name = f"{bridge['name']}, " if bridge.get("name") else ""
        condition = f", {bridge['condition']}" if bridge.get("condition") else ""
        baked = (f", FVQ {bridge['kind']} bridge baked ({name}width {bridge['width']}, depth {bridge['depth']}, "
                 f"patch {bridge['patch']}, {bridge['heads']} heads{condition})")
    return (f"converted {origin['format']} weights from {origin['weights']}: ch {cfg['model']['ch']}, ch_mult "
            f"{tuple(cfg['model']['ch_mult'])}, {cfg['quantizer']['codebook_size']} codes of dim "
            f"{cfg['quantizer']['codebook_dim']}{baked}; metric {origin['metric']} ({origin['metric_reason']})")
