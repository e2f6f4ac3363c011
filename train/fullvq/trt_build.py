"""TensorRT plans of the bundle's encoder and decoder graphs, for TensorRT 10.x and 11.x.

    profile = size_profile(manifest, (16, 256, 512))        # validated (H, W) min, opt, max in pixels
    plans, entry = build_plans(trt, members, manifest, "fp16", (1, 8, 32), profile, "sm_90", "NVIDIA H100")

Which TensorRT is present is told by what its module has, never by parsing its version string:

- precision: TensorRT 10 has `BuilderFlag.FP16` / `BF16`: the float32 graph is parsed into a
  weakly typed network and the flag lets TensorRT pick half-precision kernels. TensorRT 11 removed
  those flags (every network is strongly typed, its precision is the graph's): for fp16 the float32
  graph is converted to an fp16 one by onnxconverter-common (`float16.convert_float_to_float16`,
  float32 inputs and outputs kept, normalisation layers kept in float32), checked against the
  float32 graph in ONNX Runtime on CPU (`fp16_graph`), and parsed into a strongly typed network.
  bf16 without the flag is a TrtBuildError: no library writes bf16 ONNX graphs and fullvq does not
  write its own.
- "fp32" means float32: TensorRT's TF32 flag is on by default and rounds convolution and matmul
  inputs to 10-bit mantissas; for fp32 it is cleared (`BuilderFlag.TF32`, where it exists).
- hardware: plans are keyed by compute capability (`trt/sm_XY/`); where the builder has
  `HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY` they are built with it, so that the key is
  what they promise. Without it a plan is only promised for the GPU model that built it, which the
  manifest entry records ("gpu").
- one optimisation profile per network over batch and image size: encoder (B, 3, H, W) in pixels,
  decoder (B, D, H/f, W/f) in tokens.

Verified here: the fp16 graph's parity with the float32 graph in ONNX Runtime on CPU. Written
against NVIDIA's documented Python API of TensorRT 10.x and 11.x only: its tests run against a fake
`tensorrt` module (docs/deploy.md says what was run where).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# max |fp16 graph - fp32 graph| / max |fp32 graph| on one input (ONNX Runtime, CPU); the tiny model's
# graphs measure 6e-4 to 1.7e-3 (docs/deploy.md): 1e-2, about ten fp16 rounding steps (2^-10), leaves
# room for larger models and still catches a wrong copy (one weight off by 5% gives 5e-2).
FP16_PARITY = 1e-2
# Ops the fp16 graph keeps in float32, besides onnxconverter-common's defaults: normalisation, whose
# mean and variance over h*w positions are where fp16 loses the most.
FP16_KEEP_FLOAT32 = ["InstanceNormalization", "GroupNormalization", "LayerNormalization"]
DEFAULT_MAX_FACTOR = 2  # default largest side: twice the export size (see default_sizes)

Profile = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class TrtBuildError(RuntimeError):
    """TensorRT could not build a plan; the message says which and why."""


def default_sizes(f: int, image_size: tuple[int, int]) -> Profile:
    """The default size profile of dynamic graphs, (H, W) in pixels: min one token (f x f), opt the
    export size, max twice the export's larger side on both sides. TensorRT reserves activation
    memory for the largest shape of the profile, max batch x max side^2: twice the side is four
    times the pixels (vq16 at 512 px and batch 32 is a few GB); larger sizes need --trt-size."""
    h, w = image_size
    side = DEFAULT_MAX_FACTOR * max(h, w)
    return (f, f), (h, w), (side, side)


def size_profile(manifest: dict[str, Any], size: tuple[int, int, int] | None) -> Profile:
    """The (H, W) min, opt, max of the plans' optimisation profile in pixels: `size` = (MIN, OPT,
    MAX) applies to both sides (the export flag --trt-size); None takes default_sizes for dynamic
    graphs and the one size of fixed ones. ValueError names the flag and what is wrong."""
    f, (h, w) = int(manifest["downsample"]), tuple(manifest["image_size"])
    dynamic = bool(manifest.get("dynamic_size", False))
    if size is None:
        return default_sizes(f, (h, w)) if dynamic else ((h, w), (h, w), (h, w))
    text = ":".join(map(str, size))
    if len(size) != 3 or not all(isinstance(s, int) and s >= 1 for s in size) or not size[0] <= size[1] <= size[2]:
        raise ValueError(f"--trt-size {text}: expected MIN:OPT:MAX pixels per side with 1 <= MIN <= OPT <= MAX")
    bad = [s for s in size if s % f]
    if bad:
        lower, upper = bad[0] // f * f, -(-bad[0] // f) * f
        raise ValueError(f"--trt-size {text}: {bad[0]} is not a multiple of the downsampling factor {f} "
                         f"(use {lower or f} or {upper})")
    profile = ((size[0],) * 2, (size[1],) * 2, (size[2],) * 2)
    if not dynamic and profile != ((h, w),) * 3:
        reason = manifest.get("fixed_size_reason") or "the bundle's graphs have a fixed size"
        raise ValueError(f"--trt-size {text}: the graphs take only {h}x{w} images ({reason}); drop --trt-size"
                         + (f" or pass {h}:{h}:{h}" if h == w else ""))
    return profile


def precision_plan(trt, precision: str) -> dict[str, Any]:
    """How `precision` is built with this `trt` module: {"typing": "weak" | "strong", "flag": the
    BuilderFlag to set or None, "graph": the ONNX graph's type, "fp32" or "fp16", "tf32": whether
    TF32 stays allowed (None: this TensorRT has no TF32 flag)}. TrtBuildError for bf16 on a TensorRT
    without BuilderFlag.BF16 (TensorRT 11)."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}: expected fp32, fp16 or bf16")
    flags = trt.BuilderFlag
    tf32 = None if not hasattr(flags, "TF32") else precision != "fp32"
    weak = hasattr(flags, "FP16")  # TensorRT 10; TensorRT 11 types every network strongly
    if precision == "fp32":  # the float32 graph as it is, a plain network (strongly typed on TensorRT 11)
        return {"typing": "weak" if weak else "strong", "flag": None, "graph": "fp32", "tf32": tf32}
    if hasattr(flags, precision.upper()):  # TensorRT 10: weak typing, the builder picks half kernels
        return {"typing": "weak", "flag": getattr(flags, precision.upper()), "graph": "fp32", "tf32": tf32}
    if precision == "bf16":
        raise TrtBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.BF16: it builds only strongly typed "
                            f"networks, whose precision is the graph's, and fullvq writes no bf16 graph: export "
                            f"with --precision fp16 or fp32")
    return {"typing": "strong", "flag": None, "graph": "fp16", "tf32": tf32}  # TensorRT 11: an fp16 graph


def _strongly_typed_flag(trt):
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return getattr(creation, "STRONGLY_TYPED", None)


def hardware_level(trt) -> tuple[Any, str]:
    """(the HardwareCompatibilityLevel to build with or None, its manifest name)."""
    levels = getattr(trt, "HardwareCompatibilityLevel", None)
    level = getattr(levels, "SAME_COMPUTE_CAPABILITY", None)
    return (level, "same_compute_capability") if level is not None else (None, "none")


def fp16_graph(graph: bytes, example: np.ndarray, net: str) -> tuple[bytes, float]:
    """(the fp16 copy of the float32 `graph` with float32 inputs and outputs, its relative difference
    to `graph` on `example`). The copy is onnxconverter-common's, with FP16_KEEP_FLOAT32 kept in
    float32; both graphs run in ONNX Runtime on CPU. TrtBuildError above FP16_PARITY. (The library's
    defaults clamp weights beyond +-1e4 and raise nonzero ones below 1e-7 in magnitude to +-1e-7, each
    with a warning: the parity check is what tells whether that matters for a model.)"""
    import onnx
    import onnxruntime as ort
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load_from_string(graph), keep_io_types=True,
                                             op_block_list=float16.DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FLOAT32)
    half = model.SerializeToString()
    # ONNX Runtime's CPU provider runs fp16 nodes it has no fp16 kernel for in float32 between casts,
    # so this measures the graph's storage rounding and structure, not TensorRT's fp16 accumulation.
    sessions = [ort.InferenceSession(g, providers=["CPUExecutionProvider"]) for g in (graph, half)]
    want, got = (s.run(None, {s.get_inputs()[0].name: example})[0] for s in sessions)
    error = float(np.abs(got.astype(np.float64) - want).max() / max(1e-6, float(np.abs(want).max())))
    if not error <= FP16_PARITY:  # NaN fails too
        raise TrtBuildError(f"the fp16 copy of {net}.onnx differs from the float32 graph by {error:.2e} "
                            f"(relative), over {FP16_PARITY:.0e}: export with --precision fp32")
    return half, error


def _network_shapes(manifest: dict[str, Any], batch: tuple[int, int, int], profile: Profile) -> dict[str, list]:
    """{net: [min, opt, max] input shapes} of the encoder (pixels) and decoder (tokens)."""
    f, d = int(manifest["downsample"]), int(manifest["codebook_dim"])
    return {"encoder": [(b, 3, h, w) for b, (h, w) in zip(batch, profile, strict=True)],
            "decoder": [(b, d, h // f, w // f) for b, (h, w) in zip(batch, profile, strict=True)]}


def _example(shape: tuple[int, ...], net: str) -> np.ndarray:
    """A small input for the fp16 graph's parity check, at the profile's opt size (batch 1)."""
    rng = np.random.default_rng(0)
    if net == "encoder":
        return rng.uniform(-1, 1, (1, *shape[1:])).astype(np.float32)
    return rng.standard_normal((1, *shape[1:])).astype(np.float32)


def build_plans(trt, members: dict[str, bytes], manifest: dict[str, Any], precision: str,
                batch: tuple[int, int, int], profile: Profile, arch: str,
                gpu: str = "") -> tuple[dict[str, bytes], dict[str, Any]]:
    """({"trt/<arch>/encoder.plan": bytes, ...}, the manifest's trt entry) built with the `tensorrt`
    module `trt` on the current CUDA device (compute capability `arch`, model name `gpu`)."""
    how = precision_plan(trt, precision)
    level, level_name = hardware_level(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    shapes = _network_shapes(manifest, batch, profile)
    plans, parity = {}, {}
    for net, (low, opt, high) in shapes.items():
        graph = members[f"{net}.onnx"]
        if how["graph"] == "fp16":
            graph, parity[net] = fp16_graph(graph, _example(opt, net), net)
        strongly = _strongly_typed_flag(trt)  # for the half graph; accepted and implied on TensorRT 11
        network = builder.create_network(1 << int(strongly) if how["graph"] != "fp32" and strongly is not None
                                         else 0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(graph):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TrtBuildError(f"TensorRT cannot parse {net}.onnx ({how['graph']}): {errors}")
        config = builder.create_builder_config()
        if how["flag"] is not None:
            config.set_flag(how["flag"])
        if how["tf32"] is False:
            config.clear_flag(trt.BuilderFlag.TF32)
        if level is not None:
            config.hardware_compatibility_level = level
        optimisation = builder.create_optimization_profile()
        optimisation.set_shape(network.get_input(0).name, low, opt, high)
        config.add_optimization_profile(optimisation)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TrtBuildError(f"TensorRT {trt.__version__} failed to build the {net} plan ({precision}, "
                                f"{how['typing']}ly typed, hardware compatibility {level_name}, input shapes "
                                f"{low} to {high}); see its log above")
        plans[f"trt/{arch}/{net}.plan"] = bytes(plan)
    entry = {"tensorrt": str(trt.__version__), "precision": precision, "batch": list(batch),
             "size": [list(s) for s in profile], "typing": how["typing"], "graph": how["graph"],
             "tf32": how["tf32"], "hardware_compatibility": level_name, "gpu": gpu}
    if parity:
        entry["graph_parity"] = parity
    return plans, entry
