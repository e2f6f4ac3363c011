"""Small valid fvq.engine bundles without torch: one-layer ONNX graphs built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fullvq_rt.bundle import codebook_bytes, write_bundle


def conv_graph(kind: str, c_in: int, c_out: int, f: int, seed: int) -> bytes:
    """Conv (kernel = stride = f) or ConvTranspose (the inverse shape), dynamic batch, opset 18."""
    rng = np.random.default_rng(seed)
    shape = (c_out, c_in, f, f) if kind == "Conv" else (c_in, c_out, f, f)
    weight = numpy_helper.from_array((rng.standard_normal(shape) / (c_in * f)).astype(np.float32), "w")
    node = helper.make_node(kind, ["x", "w"], ["y"], kernel_shape=[f, f], strides=[f, f])
    graph = helper.make_graph([node], kind.lower(), [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c_in, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", c_out, None, None])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def bundle_parts(k: int = 64, d: int = 4, f: int = 4, size: int = 16) -> tuple[dict, dict]:
    """(manifest, members) of a valid bundle: 3-channel images of size x size, K codes of dim d."""
    codebook = np.random.default_rng(0).standard_normal((k, d)).astype(np.float32)
    members = {"codebook.npy": codebook_bytes(codebook), "encoder.onnx": conv_graph("Conv", 3, d, f, 1),
               "decoder.onnx": conv_graph("ConvTranspose", d, 3, f, 2)}
    manifest = {"image_size": [size, size], "downsample": f, "grid": [size // f, size // f], "codebook_size": k,
                "codebook_dim": d, "metric": "l2", "input": {"range": [-1.0, 1.0]}, "built_by": {"test": True},
                "trt": {}}
    return manifest, members


def make_bundle(path, **kw) -> None:
    write_bundle(path, *bundle_parts(**kw))
