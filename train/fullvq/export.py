"""ckpt.pt -> ONNX graphs of encoder and decoder, the baked codebook, and the fvq.engine bundle.

    report = export(ckpt, "fvq.engine", precision="fp16", batch=(1, 8, 32))   # export/to_trt.py
    export_onnx_files(ckpt, "onnx/")                                           # export/to_onnx.py

Graphs (opset 18, dynamic batch, height and width): encoder = quant_conv(encoder(image)), image
(B, 3, H, W) in [-1, 1] -> latents (B, D, H/f, W/f); decoder = decoder(post_quant_conv(codes)),
(B, D, h, w) -> (B, 3, h*f, w*f); with `generator=GPT_CKPT`, the generator's prefill and decode graphs
too (fullvq.export_gpt). Each is checked with onnx.checker and against PyTorch through ONNX Runtime at
several sizes (one token, the export size, a non-square one) before anything is written; a network
that cannot run at other sizes is exported at its one size, and the manifest says why. TensorRT plans
are built when TensorRT and a CUDA GPU are present (build_trt_plans).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


MAX_TOKENS_PER_SIDE = 4096  # the dynamic graphs' declared bound on h and w (65,536 px at f = 16)


def to_onnx(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str,
            side_factor: int | None = None) -> bytes:
    """ONNX bytes of `module`, checked by onnx.checker, with a dynamic batch dimension and, when
    `side_factor` is given, dynamic height and width (multiples of it)."""
    import onnx

    dynamic: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if side_factor is not None:
        for axis, name in ((2, "h"), (3, "w")):
            tokens = torch.export.Dim(name, min=1, max=MAX_TOKENS_PER_SIDE)
            dynamic[axis] = tokens * side_factor if side_factor > 1 else tokens
    program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=[output_name],
                                opset_version=OPSET, dynamo=True, dynamic_shapes=(dynamic,), verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def check_parity(name: str, module: nn.Module, graph: bytes, examples: list[torch.Tensor]) -> float:
    """Max over `examples` of max |ONNX Runtime - PyTorch| / max |PyTorch|; ExportError above PARITY_ATOL."""
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    worst = 0.0
    for example in examples:
        size = "x".join(map(str, example.shape[2:]))
        try:
            with torch.no_grad():
                want = module(example).numpy()
            got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
        except Exception as e:  # the network (PyTorch's or ONNX Runtime's) refuses this size
            message = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
            raise ExportError(f"{name} does not run at {size} ({message})") from e
        error = float(np.abs(got - want).max() / max(1e-6, np.abs(want).max()))
        if error > PARITY_ATOL:
            raise ExportError(f"{name}.onnx differs from PyTorch by {error:.2e} (relative) at {size}, "
                              f"over {PARITY_ATOL:.0e}")
        worst = max(worst, error)
    return worst


def checked_sizes(f: int, h: int, w: int) -> list[tuple[int, int]]:
    """The image sizes (H, W) a dynamic export is checked at: one token, the export size, and a
    non-square size twice as wide."""
    return list(dict.fromkeys([(f, f), (h, w), (h, 2 * w)]))


@dataclass
class NetworkGraphs:
    """Encoder and decoder ONNX graphs, their parity, and the manifest's size fields."""

    members: dict[str, bytes]
    parity: dict[str, float]
    sizes: dict[str, Any]


def export_networks(encoder: nn.Module, decoder: nn.Module, f: int, size: tuple[int, int],
                    codebook: np.ndarray, dynamic: bool = True) -> NetworkGraphs:
    """encoder.onnx and decoder.onnx, dynamic in H and W when both networks export and match PyTorch
    at every size of `checked_sizes`; otherwise (or when not `dynamic`) fixed at `size` = (H, W),
    with the reason."""
    reason = "exported with --fixed-size"
    if dynamic:
        try:
            return _export_at(encoder, decoder, f, size, checked_sizes(f, *size), codebook, dynamic=True)
        except Exception as e:  # torch.export's constraint errors, or a network that fails away from `size`
            lines = str(e).strip().splitlines()
            reason = "the network does not export for other sizes ({})".format(
                f"{e.__class__.__name__}: {lines[0][:300]}" if lines else repr(e))
    graphs = _export_at(encoder, decoder, f, size, [size], codebook, dynamic=False)
    graphs.sizes["fixed_size_reason"] = reason
    return graphs


def _export_at(encoder: nn.Module, decoder: nn.Module, f: int, size: tuple[int, int], sizes: list[tuple[int, int]],
               codebook: np.ndarray, dynamic: bool) -> NetworkGraphs:
    """Graphs traced at `size`, checked against PyTorch at every one of `sizes`."""
    g = torch.Generator().manual_seed(0)
    images = {s: torch.rand(2, 3, *s, generator=g) * 2 - 1 for s in sizes}
    codes = {(h, w): torch.from_numpy(codebook[torch.randint(len(codebook), (2, h // f, w // f), generator=g).numpy()])
             .permute(0, 3, 1, 2).contiguous() for h, w in sizes}
    out = NetworkGraphs(members={}, parity={},
                        sizes={"dynamic_size": dynamic, "checked_sizes": [list(s) for s in sizes]})
    for name, module, examples, names, factor in (("encoder", encoder, images, ("image", "latents"), f),
                                                  ("decoder", decoder, codes, ("codes", "image"), 1)):
        graph = to_onnx(module, examples[size], *names, side_factor=factor if dynamic else None)
        out.parity[name] = check_parity(name, module, graph, list(examples.values()))
        out.members[f"{name}.onnx"] = graph
    return out


def export_graphs(ckpt: str | Path | dict, image_size: tuple[int, int] | None = None,
                  generator: str | Path | None = None, dynamic_size: bool = True) -> Exported:
    """The checked ONNX graphs, the codebook and the manifest fields of a checkpoint (and of the
    generator checkpoint trained on its codes, when given); graphs fixed to `image_size` when not
    `dynamic_size`."""
    from fullvq_rt.bundle import codebook_bytes

    model, cfg, step = load_for_export(ckpt)
    f = downsample_factor(cfg)
    h, w = image_size or (cfg.image_size, cfg.image_size)
    if h % f or w % f:
        raise ExportError(f"image size {h}x{w} is not a multiple of the downsampling factor {f}")
    codebook = model.quantize.bake().cpu().numpy()
    graphs = export_networks(EncoderGraph(model).eval(), DecoderGraph(model).eval(), f, (h, w), codebook,
                             dynamic_size)
    out = Exported(members=graphs.members, manifest={}, parity=graphs.parity)
    out.members["codebook.npy"] = codebook_bytes(codebook)
    out.manifest = {
        "image_size": [h, w], "downsample": f, "grid": [h // f, w // f], **graphs.sizes,
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

        members, out.manifest["generator"], parity = export_generator(
            generator, len(codebook), None if graphs.sizes["dynamic_size"] else (h // f, w // f))
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
        import tensorrt
    except ImportError:
        return "the tensorrt package is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
    version = str(getattr(tensorrt, "__version__", "?"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 10:
        # the one version test: TensorRT 8/9 networks need EXPLICIT_BATCH, which no feature check tells apart
        return f"TensorRT {version} is older than 10, whose API fullvq uses: pip install 'tensorrt>=10'"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible: TensorRT plans are built for, and on, the GPU that will run them"
    return ""


def check_trt_precision(precision: str) -> None:
    """ExportError when the installed TensorRT cannot build `precision` (bf16 on TensorRT 11)."""
    import tensorrt as trt

    from .trt_build import TrtBuildError, precision_plan

    try:
        precision_plan(trt, precision)
    except TrtBuildError as e:
        raise ExportError(str(e)) from None


def build_trt_plans(exported: Exported, precision: str, batch: tuple[int, int, int],
                    size: tuple[int, int, int] | None = None) -> None:
    """Adds trt/sm_XY/{encoder,decoder}.plan for this GPU and their manifest entry, with one
    optimisation profile per network over batch (min, opt, max) and image side `size` (min, opt,
    max pixels, both sides; None: fullvq.trt_build.size_profile's default). Inputs and outputs stay
    float32. TensorRT 10 and 11 are told apart by feature (fullvq.trt_build)."""
    import tensorrt as trt

    from .trt_build import TrtBuildError, build_plans, size_profile

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    try:
        profile = size_profile(exported.manifest, size)
        plans, entry = build_plans(trt, exported.members, exported.manifest, precision, batch, profile, arch,
                                   torch.cuda.get_device_name())
    except (TrtBuildError, ValueError) as e:
        raise ExportError(str(e)) from None
    exported.members.update(plans)
    exported.manifest["trt"][arch] = entry


def export(ckpt: str | Path | dict, out: str | Path, precision: str = "fp16", batch: tuple[int, int, int] = (1, 8, 32),
           image_size: tuple[int, int] | None = None, require_trt: bool = False,
           generator: str | Path | None = None, trt_size: tuple[int, int, int] | None = None,
           dynamic_size: bool = True) -> Exported:
    """Writes the fvq.engine bundle of `ckpt` to `out`: ONNX graphs and codebook always, TensorRT
    plans for this GPU when TensorRT and a GPU are present (else `trt_skipped` says why, or, with
    `require_trt`, ExportError). `trt_size` = (MIN, OPT, MAX) pixels per image side of the plans'
    optimisation profile (multiples of the downsampling factor; default: fullvq.trt_build.default_sizes
    for dynamic graphs, the one size of fixed ones). Graphs fixed to `image_size` when not `dynamic_size`."""
    from fullvq_rt.bundle import write_bundle

    from .trt_build import size_profile

    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}: expected fp32, fp16 or bf16")
    if not (len(batch) == 3 and 1 <= batch[0] <= batch[1] <= batch[2]):
        raise ValueError(f"batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {batch}")
    if trt_size is not None and not (len(trt_size) == 3 and 1 <= trt_size[0] <= trt_size[1] <= trt_size[2]):
        raise ValueError(f"--trt-size must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {trt_size}")
    trt_skipped = tensorrt_unavailable()
    if trt_skipped and require_trt:
        raise ExportError(f"--require-trt: cannot build TensorRT plans: {trt_skipped}")
    if not trt_skipped:
        check_trt_precision(precision)  # before the ONNX export's minutes: bf16 on TensorRT 11 fails here
    exported = export_graphs(ckpt, image_size, generator, dynamic_size)
    size_profile(exported.manifest, trt_size)  # a wrong --trt-size fails here too, with or without TensorRT
    exported.trt_skipped = trt_skipped
    if not trt_skipped:
        build_trt_plans(exported, precision, batch, trt_size)
    write_bundle(out, exported.manifest, exported.members)
    return exported


def export_onnx_files(ckpt: str | Path | dict, out_dir: str | Path, image_size: tuple[int, int] | None = None,
                      generator: str | Path | None = None, dynamic_size: bool = True) -> Exported:
    """Writes encoder.onnx, decoder.onnx and codebook.npy (the graphs need it) to `out_dir`, and
    generator/{prefill,decode}.onnx when `generator` is given."""
    exported = export_graphs(ckpt, image_size, generator, dynamic_size)
    out_dir = Path(out_dir)
    for name, data in exported.members.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_bytes(data)
    return exported
