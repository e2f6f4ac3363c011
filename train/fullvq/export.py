"""ckpt.pt -> ONNX graphs of encoder and decoder, the baked codebook, and the fvq.engine bundle.

    report = export(ckpt, "fvq.engine", precision="fp16", batch=(1, 8, 32))   # export/to_trt.py
    export_onnx_files(ckpt, "onnx/")                                           # export/to_onnx.py

Graphs (opset 18, dynamic batch): encoder = quant_conv(encoder(image)), image (B, 3, H, W) in
[-1, 1] -> latents (B, D, h, w); decoder = decoder(post_quant_conv(codes)), (B, D, h, w) ->
(B, 3, H, W); with `generator=GPT_CKPT`, the generator's prefill and decode graphs too
(fullvq.export_gpt). Each is checked with onnx.checker and against PyTorch through ONNX Runtime before
anything is written. TensorRT plans are built when TensorRT and a CUDA GPU are present (trt_build).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint
from .config import Config

OPSET = 18
PARITY_ATOL = 1e-4  # max |ONNX Runtime - PyTorch| relative to the output's scale


class ExportError(RuntimeError):
    """A graph failed a check; the message says which and by how much."""


class EncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder, self.quant_conv = model.encoder, model.quant_conv

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(image))


class DecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder, self.post_quant_conv = model.decoder, model.post_quant_conv

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(codes))


@dataclass
class Exported:
    """What export produced: graphs, codebook, manifest fields, checks, and TensorRT's outcome."""

    members: dict[str, bytes]
    manifest: dict
    parity: dict[str, float] = field(default_factory=dict)
    trt_skipped: str = ""


def downsample_factor(cfg: Config) -> int:
    return 2 ** (len(cfg.model.ch_mult) - 1)


def checkpoint_name(ckpt: str | Path | dict) -> str:
    """The file a checkpoint (path, or dict loaded or converted from one) came from."""
    if isinstance(ckpt, dict):
        return ckpt.get("converted_from", {}).get("path", "(checkpoint dict)")
    return str(ckpt)


def load_for_export(ckpt: str | Path | dict) -> tuple[nn.Module, Config, int]:
    """(model in float32 eval mode, config, training step) of a checkpoint: a path, or a checkpoint
    dict (checkpoint.load, or fullvq.interop.convert for published LlamaGen / FVQ weights)."""
    state = checkpoint.state_of(ckpt)
    model, cfg = checkpoint.model_from_state(state)
    if cfg.quantizer.residual_depth > 1:
        raise ExportError(f"{checkpoint_name(ckpt)}: residual quantizers (residual_depth="
                          f"{cfg.quantizer.residual_depth}) cannot be exported yet: the bundle holds one codebook")
    return model.float().eval(), cfg, int(state["step"])


def to_onnx(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str) -> bytes:
    """ONNX bytes of `module` with a dynamic batch dimension, checked by onnx.checker."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=[output_name],
                                opset_version=OPSET, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def check_parity(name: str, module: nn.Module, graph: bytes, example: torch.Tensor) -> float:
    """Max |ONNX Runtime - PyTorch| / max |PyTorch| on `example`; ExportError above PARITY_ATOL."""
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        want = module(example).numpy()
    error = float(np.abs(got - want).max() / max(1e-6, np.abs(want).max()))
    if error > PARITY_ATOL:
        raise ExportError(f"{name}.onnx differs from PyTorch by {error:.2e} (relative), over {PARITY_ATOL:.0e}")
    return error


def export_graphs(ckpt: str | Path | dict, image_size: tuple[int, int] | None = None,
                  generator: str | Path | None = None) -> Exported:
    """The checked ONNX graphs, the codebook and the manifest fields of a checkpoint (and of the
    generator checkpoint trained on its codes, when given)."""
    from fullvq_rt.bundle import codebook_bytes

    model, cfg, step = load_for_export(ckpt)
    f = downsample_factor(cfg)
    h, w = image_size or (cfg.image_size, cfg.image_size)
    if h % f or w % f:
        raise ExportError(f"image size {h}x{w} is not a multiple of the downsampling factor {f}")
    codebook = model.quantize.bake().cpu().numpy()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    codes = torch.from_numpy(codebook[torch.randint(len(codebook), (2, h // f, w // f), generator=g).numpy()])
    codes = codes.permute(0, 3, 1, 2).contiguous()
    encoder, decoder = EncoderGraph(model).eval(), DecoderGraph(model).eval()
    out = Exported(members={}, manifest={})
    for name, module, example, names in (("encoder", encoder, image, ("image", "latents")),
                                         ("decoder", decoder, codes, ("codes", "image"))):
        graph = to_onnx(module, example, *names)
        out.parity[name] = check_parity(name, module, graph, example)
        out.members[f"{name}.onnx"] = graph
    out.members["codebook.npy"] = codebook_bytes(codebook)
    out.manifest = {
        "image_size": [h, w], "downsample": f, "grid": [h // f, w // f],
        "codebook_size": int(codebook.shape[0]), "codebook_dim": int(codebook.shape[1]),
        "metric": model.quantize.metric,
        "input": {"layout": "NCHW", "dtype": "float32", "range": [-1.0, 1.0], "from_uint8": "x / 127.5 - 1"},
        "built_by": {"fullvq": _version(), "torch": torch.__version__, "opset": OPSET, "host": platform.node(),
                     "checkpoint": checkpoint_name(ckpt), "quantizer": cfg.quantizer.name, "preset": cfg.preset,
                     "step": step},
        "trt": {},
    }
    if isinstance(ckpt, dict) and "converted_from" in ckpt:
        out.manifest["built_by"]["converted_from"] = ckpt["converted_from"]
    if generator is not None:
        from .export_gpt import export_generator

        members, out.manifest["generator"], parity = export_generator(generator, len(codebook), (h // f, w // f))
        out.members.update(members)
        out.parity.update(parity)
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fullvq")
    except PackageNotFoundError:
        return "unknown"


def tensorrt_unavailable() -> str:
    """Why TensorRT plans cannot be built here ("" when they can)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible: TensorRT plans are built for, and on, the GPU that will run them"
    return ""


def build_trt_plans(exported: Exported, precision: str, batch: tuple[int, int, int]) -> None:
    """Adds trt/sm_XY/{encoder,decoder}.plan for this GPU and their manifest entry, with one
    optimisation profile per network over batch (min, opt, max). ONNX inputs and outputs stay float32."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    m = exported.manifest
    (h, w), (gh, gw), d = m["image_size"], m["grid"], m["codebook_dim"]
    shapes = {"encoder": (3, h, w), "decoder": (d, gh, gw)}
    for net, shape in shapes.items():
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(exported.members[f"{net}.onnx"]):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse {net}.onnx: {errors}")
        config = builder.create_builder_config()
        if precision in ("fp16", "bf16"):
            config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        profile = builder.create_optimization_profile()
        profile.set_shape(network.get_input(0).name, *[(b, *shape) for b in batch])
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"TensorRT failed to build the {net} plan (see its log above)")
        exported.members[f"trt/{arch}/{net}.plan"] = bytes(plan)
    m["trt"][arch] = {"tensorrt": trt.__version__, "precision": precision, "batch": list(batch)}


def export(ckpt: str | Path | dict, out: str | Path, precision: str = "fp16", batch: tuple[int, int, int] = (1, 8, 32),
           image_size: tuple[int, int] | None = None, require_trt: bool = False,
           generator: str | Path | None = None) -> Exported:
    """Writes the fvq.engine bundle of `ckpt` to `out`: ONNX graphs and codebook always, TensorRT
    plans for this GPU when TensorRT and a GPU are present (else `trt_skipped` says why, or, with
    `require_trt`, ExportError)."""
    from fullvq_rt.bundle import write_bundle

    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}: expected fp32, fp16 or bf16")
    if not (len(batch) == 3 and 1 <= batch[0] <= batch[1] <= batch[2]):
        raise ValueError(f"batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {batch}")
    exported = export_graphs(ckpt, image_size, generator)
    exported.trt_skipped = tensorrt_unavailable()
    if exported.trt_skipped and require_trt:
        raise ExportError(f"--require-trt: cannot build TensorRT plans: {exported.trt_skipped}")
    if not exported.trt_skipped:
        build_trt_plans(exported, precision, batch)
    write_bundle(out, exported.manifest, exported.members)
    return exported


def export_onnx_files(ckpt: str | Path | dict, out_dir: str | Path, image_size: tuple[int, int] | None = None,
                      generator: str | Path | None = None) -> Exported:
    """Writes encoder.onnx, decoder.onnx and codebook.npy (the graphs need it) to `out_dir`, and
    generator/{prefill,decode}.onnx when `generator` is given."""
    exported = export_graphs(ckpt, image_size, generator)
    out_dir = Path(out_dir)
    for name, data in exported.members.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_bytes(data)
    return exported
