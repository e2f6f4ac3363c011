"""Network backends of the Tokenizer: each runs the bundle's encoder and decoder graphs.

    backend.encode(x)   # (B, 3, H, W) float32 in [-1, 1] -> (B, D, h, w) float32 latents
    backend.decode(z)   # (B, D, h, w) float32 code vectors -> (B, 3, H, W) float32
    backend.name, backend.device
"""

from __future__ import annotations

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
    this GPU and TensorRT version, else ONNX Runtime (CUDA provider when present, else CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    kind, index = parse_device(device)
    if backend == "tensorrt" or (backend == "auto" and kind != "cpu"):
        usable, reason = tensorrt_status(bundle, index)
        if usable:
            return TensorRTBackend(bundle, index)
        if backend == "tensorrt":
            raise EngineError(f"{bundle.path}: cannot use TensorRT: {reason}")
    return OnnxRuntimeBackend(bundle, kind, index, num_threads)
