"""fullvq_rt: the fullvq runtime (no torch needed).

>>> import numpy as np, fullvq_rt
>>> codebook = np.random.default_rng(0).standard_normal((16384, 8), dtype=np.float32)
>>> fullvq_rt.Codebook(codebook).nearest(codebook[[5, 7]])
array([5, 7], dtype=int32)

Tokenizer("fvq.engine").encode(img) / .decode(ids): see fullvq_rt.tokenizer.
Generator("fvq.engine").sample(class_ids, cfg=4.0, seed=0): see fullvq_rt.generator.
"""

from .bundle import EngineError
from .generator import Generator
from .lookup import Codebook, cpu_kernels, cuda_available, nearest
from .sampling import sample_logits
from .tokenizer import Tokenizer

__all__ = ["Codebook", "EngineError", "Generator", "Tokenizer", "cpu_kernels", "cuda_available", "nearest",
           "sample_logits"]
__version__ = "0.1.0"
