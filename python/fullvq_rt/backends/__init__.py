"""Network backends of the Tokenizer: each runs the bundle's encoder and decoder graphs.

    backend.encode(x)   # (B, 3, H, W) float32 in [-1, 1] -> (B, D, h, w) float32 latents
    backend.decode(z)   # (B, D, h, w) float32 code vectors -> (B, 3, H, W) float32
    backend.name, backend.device
"""

from __future__ import annotations

import warnings

from ..bundle import Bundle, EngineError
from .ort import OnnxRuntimeBackend
from .trt import TensorRTBackend, tensorrt_status

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def parse_device(device: str) -> tuple[str, int]:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> (kind, index)."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return kind, int(index or 0)


def open_backend(bundle: Bundle, device: str, backend: str, num_threads: int | None):
    """The backend for `device` and `backend` (see Tokenizer): for "auto", a TensorRT plan that fits
    this GPU and TensorRT version, else ONNX Runtime (CUDA provider when present, else CPU), with a
    RuntimeWarning saying why when the bundle has TensorRT plans that are not used."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    kind, index = parse_device(device)
    if backend == "tensorrt" or (backend == "auto" and kind != "cpu"):
        usable, reason = tensorrt_status(bundle, index)
        if usable:
            try:
                return TensorRTBackend(bundle, index)
            except EngineError as e:  # e.g. a plan this TensorRT or GPU cannot deserialise
                if backend == "tensorrt":
                    raise
                usable, reason = False, str(e)
        if backend == "tensorrt":
            raise EngineError(f"{bundle.path}: cannot use TensorRT: {reason}")
        if bundle.trt:  # plans were shipped for speed: say why they are not used
            warnings.warn(f"{bundle.path}: using ONNX Runtime, not the bundle's TensorRT plans: {reason} "
                          f"(pass backend='onnxruntime' to choose it explicitly)", RuntimeWarning, stacklevel=3)
    return OnnxRuntimeBackend(bundle, kind, index, num_threads)
