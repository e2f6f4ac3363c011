import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """(checkpoint, fvq.engine) of a tiny tokenizer trained for a few steps on one real photo:
    16 px images, 4 x 4 tokens, K = 1024."""
    pytest.importorskip("torch")
    from fullvq.config import preset
    from fullvq.data import default_photos
    from fullvq.export import export
    from fullvq.trainer import train

    root = tmp_path_factory.mktemp("tiny_engine")
    (root / "photos").mkdir()
    default_photos()[0].resize((64, 64)).save(root / "photos" / "astronaut.png")
    cfg = preset("tiny")
    cfg.out, cfg.data, cfg.steps, cfg.batch_size, cfg.image_size = str(root / "run"), str(root / "photos"), 6, 4, 16
    cfg.quantizer.codebook_size, cfg.eval_crops = 1024, 4
    train(cfg)
    ckpt = root / "run" / "ckpt.pt"
    export(ckpt, root / "fvq.engine")
    return ckpt, root / "fvq.engine"


@pytest.fixture(scope="session")
def tiny_generator(tiny_engine, tmp_path_factory):
    """(gen.engine, tokenizer ckpt, generator ckpt, export report): tiny_engine's tokenizer with a tiny
    random generator (gpt_factory: 3 classes, 2 layers) exported beside it."""
    from fullvq.export import export
    from gpt_factory import gpt_checkpoint

    from fullvq_rt import Tokenizer

    tok_ckpt, tok_engine = tiny_engine
    folder = tmp_path_factory.mktemp("generator")
    tok = Tokenizer(tok_engine)
    gpt = gpt_checkpoint(folder / "gpt.pt", len(tok.codebook), tok.grid)
    report = export(tok_ckpt, folder / "gen.engine", generator=gpt)
    return folder / "gen.engine", tok_ckpt, gpt, report
