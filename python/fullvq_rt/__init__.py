"""fullvq_rt: the fullvq runtime (no torch needed).

>>> import numpy as np, fullvq_rt
>>> codebook = np.random.default_rng(0).standard_normal((16384, 8), dtype=np.float32)
>>> fullvq_rt.Codebook(codebook).nearest(codebook[[5, 7]])
array([5, 7], dtype=int32)

Tokenizer("fvq.engine").encode(img) / .decode(ids): see fullvq_rt.tokenizer.
"""

from .bundle import EngineError
from .lookup import Codebook, cpu_kernels, cuda_available, nearest
from .tokenizer import Tokenizer

__all__ = ["Codebook", "EngineError", "Tokenizer", "cpu_kernels", "cuda_available", "nearest"]
__version__ = "0.1.0"
