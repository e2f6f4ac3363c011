"""The PyTorch reference sampler: filter semantics on hand-made logits, greedy generation against
teacher forcing, seeding, CFG batch doubling, errors, and the train/sample.py command line."""

import importlib.util
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from fullvq.gpt_config import GPTConfig, GPTModelConfig
from fullvq.models.gpt import GPT
from fullvq.sampling import filter_logits, generate, sample_logits

SAMPLE = Path(__file__).resolve().parents[1] / "train" / "sample.py"
CLASSES = 3


def tiny_gpt(vocab: int = 40, grid: tuple[int, int] = (3, 3), seed: int = 0) -> GPT:
    """A random tiny GPT whose head is scaled up so that its logits have clear maxima."""
    torch.manual_seed(seed)
    gpt = GPT(GPTModelConfig(dim=32, n_layer=2, n_head=2), vocab, grid, CLASSES).eval()
    with torch.no_grad():
        gpt.output.weight.normal_(0, 1.0)
    return gpt


def kept(log_probs: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row > -math.inf)[:, 0].tolist() for row in log_probs]


def test_top_k_keeps_k_tokens_ties_to_the_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert kept(filter_logits(logits, top_k=1)) == [[1], [0]]
    assert kept(filter_logits(logits, top_k=2)) == [[1, 2], [0, 1]]
    assert kept(filter_logits(logits, top_k=3)) == [[1, 2, 3], [0, 1, 2]]
    for off in (0, 4, 10):   # 0 and k >= V: no top-k
        torch.testing.assert_close(filter_logits(logits, top_k=off), logits.log_softmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p_ties_to_the_lower_index():
    probs = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    logits = probs.log()
    assert kept(filter_logits(logits, top_p=0.45)) == [[1]]
    assert kept(filter_logits(logits, top_p=0.6)) == [[1, 2]]
    assert kept(filter_logits(logits, top_p=0.8)) == [[1, 2, 3]]
    assert kept(filter_logits(logits, top_p=0.95)) == [[0, 1, 2, 3]]
    uniform = torch.zeros(1, 4)   # probabilities 0.25 exactly: mass 0.5 is reached by two tokens
    assert kept(filter_logits(uniform, top_p=0.5)) == [[0, 1]]
    assert kept(filter_logits(uniform, top_p=0.5000001)) == [[0, 1, 2]]
    assert kept(filter_logits(uniform, top_p=1e-6)) == [[0]]
    torch.testing.assert_close(filter_logits(logits, top_p=0.6).exp(), torch.tensor([[0, 5 / 7, 2 / 7, 0]]))


def test_top_p_applies_to_the_softmax_of_the_top_k_survivors():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert kept(filter_logits(logits, top_p=0.5)) == [[0, 1]]          # 0.4 < 0.5
    assert kept(filter_logits(logits, top_k=2, top_p=0.5)) == [[0]]    # 4/7 >= 0.5


def test_cfg_and_temperature():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 7, generator=g)
    rows = torch.cat([cond, uncond])
    for s in (0.0, 1.5, 4.0):
        torch.testing.assert_close(filter_logits(rows, cfg_scale=s), (uncond + s * (cond - uncond)).log_softmax(-1))
    torch.testing.assert_close(filter_logits(rows, cfg_scale=1.0), rows.log_softmax(-1))   # no pairing
    torch.testing.assert_close(filter_logits(rows, cfg_scale=2.0, temperature=0.5),
                               ((2 * cond - uncond) / 0.5).log_softmax(-1))
    assert filter_logits(rows[:3], cfg_scale=1.0).shape == (3, 7)


def test_sample_logits_draws_from_the_filtered_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits, top_k=3, generator=g)
    assert draws.shape == (4000,) and draws.dtype == torch.int64
    counts = torch.bincount(draws, minlength=4).double()
    want = torch.tensor([0.5, 0.3, 0.15, 0.0], dtype=torch.double) / 0.95 * 4000
    assert counts[3] == 0
    assert ((counts - want).abs() < 5 * want.clamp(min=1).sqrt()).all(), counts


@pytest.mark.parametrize("kwargs, name", [
    (dict(cfg_scale=-0.1), "cfg_scale"), (dict(cfg_scale=math.nan), "cfg_scale"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_p=math.nan), "top_p")])
def test_bad_sampling_parameters_are_value_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        filter_logits(torch.zeros(2, 5), **kwargs)
    with pytest.raises(ValueError, match=name):
        generate(tiny_gpt(), torch.tensor([0]), **kwargs)


def test_bad_logits_are_value_errors():
    with pytest.raises(ValueError, match="even number of logit rows"):
        filter_logits(torch.zeros(3, 5), cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"logits have shape \(5,\)"):
        filter_logits(torch.zeros(5))


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_generation_is_the_argmax_of_teacher_forcing_on_its_output(cfg):
    gpt = tiny_gpt()
    labels = torch.tensor([0, 2, 1, 2])
    tokens = generate(gpt, labels, cfg_scale=cfg, top_k=1, seed=0)
    assert tokens.shape == (4, 9) and tokens.dtype == torch.int64
    with torch.no_grad():
        cond = gpt(tokens, labels)
        uncond = gpt(tokens, torch.full_like(labels, gpt.null_class))
    guided = uncond + cfg * (cond - uncond)
    assert torch.equal(tokens, guided.argmax(-1))
    assert len(tokens.unique()) > 3   # the test is not passing on a constant sequence


def test_same_seed_same_tokens_other_seed_other_tokens():
    gpt = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 0])
    kwargs = dict(cfg_scale=2.0, temperature=1.5, top_k=20, top_p=0.95)
    a = generate(gpt, labels, seed=7, **kwargs)
    assert torch.equal(a, generate(gpt, labels, seed=7, **kwargs))
    assert not torch.equal(a, generate(gpt, labels, seed=8, **kwargs))
    assert not torch.equal(generate(gpt, labels, **kwargs), generate(gpt, labels, **kwargs))   # seed None: fresh


def test_cfg_doubles_the_batch_only_when_guiding(monkeypatch):
    gpt = tiny_gpt()
    rows = []
    prefill = gpt.prefill

    def spy(labels):
        rows.append(labels.tolist())
        return prefill(labels)

    monkeypatch.setattr(gpt, "prefill", spy)
    generate(gpt, torch.tensor([2, 0]), cfg_scale=1.0, seed=0)
    generate(gpt, torch.tensor([2, 0]), cfg_scale=0.0, seed=0)
    assert rows == [[2, 0], [2, 0, CLASSES, CLASSES]]


def test_unknown_classes_are_value_errors_and_the_mode_is_restored():
    gpt = tiny_gpt().train()
    for labels in ([CLASSES], [-1], [0, 7]):
        with pytest.raises(ValueError, match="unknown class"):
            generate(gpt, torch.tensor(labels))
    with pytest.raises(ValueError, match="labels are torch.int32"):
        generate(gpt, torch.tensor([0], dtype=torch.int32))
    generate(gpt, torch.tensor([1]), seed=0)
    assert gpt.training


@pytest.fixture(scope="module")
def sample():
    """train/sample.py as a module."""
    spec = importlib.util.spec_from_file_location("sample", SAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator_ckpt(tiny_engine, tmp_path_factory):
    """A tiny random generator checkpoint over the tiny tokenizer's codes (K = 1024, 4 x 4 tokens)."""
    from fullvq.checkpoint import save

    tokenizer = tiny_engine[0]
    cfg = GPTConfig(model=GPTModelConfig(dim=32, n_layer=2, n_head=2), vocab_size=1024, grid=(4, 4),
                    num_classes=CLASSES, tokenizer=str(tokenizer))
    gpt = tiny_gpt(cfg.vocab_size, cfg.grid)
    path = tmp_path_factory.mktemp("gpt") / "ckpt.pt"
    save(path, {"kind": "gpt", "config": asdict(cfg), "model": gpt.state_dict(), "step": 0})
    return path, gpt, tokenizer


def test_sample_cli_writes_the_decoded_grid(sample, generator_ckpt, tmp_path):
    from fullvq.checkpoint import load_model

    path, gpt, tokenizer = generator_ckpt
    out = sample.main([str(path), "--classes", "0,2,1,1", "--cfg", "2", "--top-k", "5", "--seed", "3",
                       "--columns", "3", "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    labels = torch.tensor([0, 2, 1, 1])
    vq = load_model(tokenizer)[0]
    tokens = generate(gpt, labels, cfg_scale=2.0, top_k=5, seed=3)
    with torch.no_grad():
        images = vq.decode_codes(tokens.view(4, 4, 4), vq.quantize.bake())
    got = np.asarray(Image.open(out))
    assert got.shape == (32, 48, 3)   # 4 images of 16 px, 3 per row, the last row padded black
    np.testing.assert_array_equal(got, sample.image_grid(images, 3))
    assert (got[16:, 16:] == 0).all() and got[:16].std() > 0


def test_sample_cli_errors(sample, generator_ckpt, tmp_path):
    from fullvq.checkpoint import save

    path, gpt, tokenizer = generator_ckpt
    run = subprocess.run([sys.executable, str(SAMPLE), str(path), "--classes", "0,x"], capture_output=True, text=True)
    assert run.returncode != 0 and "--classes '0,x': expected comma-separated integers" in run.stderr
    with pytest.raises(SystemExit, match=r"--classes '0,3'.*classes 0 \.\. 2"):
        sample.main([str(path), "--classes", "0,3", "--out", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit, match="top_p"):
        sample.main([str(path), "--top-p", "0", "--out", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit, match="not a generator"):
        sample.main([str(tokenizer), "--out", str(tmp_path / "a.png")])
    other = GPTConfig(model=GPTModelConfig(dim=32, n_layer=2, n_head=2), vocab_size=40, grid=(3, 3),
                      num_classes=CLASSES, tokenizer=str(tokenizer))
    save(tmp_path / "other.pt", {"kind": "gpt", "config": asdict(other), "model": tiny_gpt().state_dict(), "step": 0})
    with pytest.raises(SystemExit, match=r"codebook of shape \(1024, .*needs \(40, D\)"):
        sample.main([str(tmp_path / "other.pt"), "--out", str(tmp_path / "a.png")])
    assert not (tmp_path / "a.png").exists()

