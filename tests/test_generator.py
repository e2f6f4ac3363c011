"""Generator export (prefill + decode graphs in the bundle) and fullvq_rt.Generator against the
PyTorch reference loop it came from."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import bundle_parts
from gpt_factory import NUM_CLASSES, gpt_checkpoint
from fullvq_rt import EngineError, Generator
from fullvq_rt.bundle import write_bundle

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

EXPORT = Path(__file__).resolve().parents[1] / "export"


@pytest.fixture(scope="module")
def reference(tiny_generator):
    from fullvq.checkpoint import load_gpt

    return load_gpt(tiny_generator[2])[0]


def test_export_checks_both_graphs_and_records_the_settings(tiny_generator):
    path, _, _, report = tiny_generator
    assert set(report.parity) >= {"generator/prefill", "generator/decode"}  # both graphs were checked
    gen = Generator(path, device="cpu")
    s = gen.spec
    assert (s.num_classes, s.null_class, s.layers, s.heads, s.head_dim) == (NUM_CLASSES, NUM_CLASSES, 2, 2, 16)
    assert s.seq_len == s.grid[0] * s.grid[1] and s.vocab_size == len(gen.tokenizer.codebook)


def test_export_fails_when_a_generator_graph_differs_from_pytorch(tiny_engine, tiny_generator, tmp_path, monkeypatch):
    from fullvq import export_gpt
    from fullvq.export import ExportError, export

    monkeypatch.setattr(export_gpt, "PARITY_ATOL", -1.0)  # every graph now fails the check
    with pytest.raises(ExportError, match=r"generator/prefill.onnx differs from PyTorch by .* over -1e\+00"):
        export(tiny_engine[0], tmp_path / "x.engine", generator=tiny_generator[2])
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_generation_equals_pytorch_token_for_token(tiny_generator, reference, cfg):
    from fullvq.sampling import generate

    labels = np.array([0, 1, 2, 1])
    gen = Generator(tiny_generator[0], device="cpu")
    got = gen.sample_tokens(labels, cfg=cfg, top_k=1, seed=0)
    want = generate(reference, torch.from_numpy(labels), cfg_scale=cfg, top_k=1, seed=0).numpy()
    assert got.shape == (4, *gen.spec.grid) and got.dtype == np.int32
    np.testing.assert_array_equal(got.reshape(4, -1), want)


def test_same_seed_same_images_and_seeds_differ(tiny_generator):
    gen = Generator(tiny_generator[0], device="cpu", num_threads=1)
    kwargs = dict(cfg=2.0, temperature=1.0, top_k=50, top_p=0.9)
    a = gen.sample([0, 2], seed=7, **kwargs)
    assert a.shape == (2, *gen.image_size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, gen.sample([0, 2], seed=7, **kwargs))
    two_threads = Generator(tiny_generator[0], device="cpu", num_threads=2)
    np.testing.assert_array_equal(gen.sample_tokens([0, 2], seed=7, **kwargs),
                                  two_threads.sample_tokens([0, 2], seed=7, **kwargs))
    assert not np.array_equal(gen.sample_tokens([0, 2], seed=7, **kwargs), gen.sample_tokens([0, 2], seed=8, **kwargs))
    assert gen.sample(1, seed=0).shape == (*gen.image_size, 3)  # one class id -> one image


@pytest.mark.parametrize("kwargs, name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(cfg=-0.5), "cfg"),
    (dict(temperature=0.0), "temperature")])
def test_bad_sampling_parameters_are_value_errors(tiny_generator, kwargs, name):
    with pytest.raises(ValueError, match=name):
        Generator(tiny_generator[0], device="cpu").sample_tokens([0], seed=0, **kwargs)


@pytest.mark.parametrize("classes", [[NUM_CLASSES], [-1], [0, 7], [], [[0, 1]], [0.5]])
def test_unknown_or_malformed_classes_are_value_errors(tiny_generator, classes):
    with pytest.raises(ValueError, match="class"):
        Generator(tiny_generator[0], device="cpu").sample_tokens(classes, seed=0)


def test_bundle_without_generator_is_refused(tiny_engine):
    with pytest.raises(EngineError, match="no generator.*--generator"):
        Generator(tiny_engine[1])


def _generator_parts(**section):
    manifest, members = bundle_parts()
    members.update({"generator/prefill.onnx": b"p", "generator/decode.onnx": b"d"})
    manifest["generator"] = dict(vocab_size=64, grid=[4, 4], num_classes=3, null_class=3, layers=1, heads=1,
                                 head_dim=4, seq_len=16, **section)
    return manifest, members


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=65), "do not match"), (dict(seq_len=15), "sequence length 15 is not its grid"),
    (dict(null_class=2), "null class"), (dict(layers=0), "positive integers"), (dict(grid=[4]), "grid"),
    (dict(grid=[8, 8], seq_len=64), r"grid \(8, 8\) do not match the tokenizer's 64 codes in a \(4, 4\) grid")])
def test_inconsistent_generator_section_is_an_engine_error(tmp_path, change, message):
    from fullvq_rt.bundle import read_bundle

    manifest, members = _generator_parts()
    manifest["generator"].update(change)
    write_bundle(tmp_path / "bad.engine", manifest, members)
    with pytest.raises(EngineError, match=message):
        read_bundle(tmp_path / "bad.engine")


def test_a_tokenizer_of_any_size_takes_a_generator_of_another_grid(tmp_path):
    from fullvq_rt.bundle import describe, read_bundle

    manifest, members = _generator_parts()  # a 16 px, 4 x 4 token tokenizer whose graphs take any size
    manifest["generator"].update(grid=[8, 8], seq_len=64)  # trained on codes of 32 px images
    write_bundle(tmp_path / "a.engine", dict(manifest, dynamic_size=True), members)
    bundle = read_bundle(tmp_path / "a.engine")
    assert bundle.generator.grid == (8, 8) and "8x8 tokens (32x32 px)" in describe(bundle)


def test_export_takes_a_generator_of_another_grid_when_the_tokenizer_takes_any_size(tiny_engine, tmp_path):
    from fullvq.export import export

    gpt = gpt_checkpoint(tmp_path / "gpt.pt", vocab=1024, grid=(6, 5))  # codes of 24 x 20 px images
    export(tiny_engine[0], tmp_path / "g.engine", generator=gpt)
    gen = Generator(tmp_path / "g.engine", device="cpu")
    assert gen.grid == (6, 5) and gen.image_size == (24, 20)
    assert gen.sample([0, 1], top_k=1, seed=0).shape == (2, 24, 20, 3)


def test_generator_members_and_section_come_together(tmp_path):
    from fullvq_rt.bundle import read_bundle

    manifest, members = _generator_parts()
    del members["generator/decode.onnx"]
    write_bundle(tmp_path / "a.engine", manifest, members)
    with pytest.raises(EngineError, match="decode.onnx.*missing"):
        read_bundle(tmp_path / "a.engine")
    manifest, members = _generator_parts()
    del manifest["generator"]
    write_bundle(tmp_path / "b.engine", manifest, members)
    with pytest.raises(EngineError, match="no 'generator' section"):
        read_bundle(tmp_path / "b.engine")


def test_decode_graph_of_another_layout_is_refused(tiny_generator, tmp_path):
    from fullvq_rt.bundle import read_bundle

    bundle = read_bundle(tiny_generator[0])
    members = dict(bundle.members)
    members["generator/decode.onnx"] = members["generator/prefill.onnx"]  # inputs ["labels"]
    manifest = json.loads(zipfile.ZipFile(tiny_generator[0]).read("manifest.json"))
    write_bundle(tmp_path / "old.engine", manifest, members)
    with pytest.raises(EngineError, match="takes inputs \\['labels'\\].*per-layer KV cache.*re-export"):
        Generator(tmp_path / "old.engine")


def test_export_refuses_a_generator_of_another_tokenizer(tiny_engine, tmp_path):
    from fullvq.export import ExportError, export

    gpt = gpt_checkpoint(tmp_path / "gpt.pt", vocab=512, grid=(4, 4))
    with pytest.raises(ExportError, match="512 codes"):
        export(tiny_engine[0], tmp_path / "x.engine", generator=gpt)


def test_cli_exports_tokenizer_and_generator(tiny_generator, tmp_path):
    out = tmp_path / "cli.engine"
    _, tok_ckpt, gpt_ckpt, _ = tiny_generator
    run = subprocess.run([sys.executable, str(EXPORT / "to_trt.py"), str(tok_ckpt), "--generator", str(gpt_ckpt),
                          "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "generator/decode" in run.stdout
    np.testing.assert_array_equal(Generator(out, device="cpu").sample_tokens([0, 2], top_k=1, seed=0),
                                  Generator(tiny_generator[0], device="cpu").sample_tokens([0, 2], top_k=1, seed=0))
