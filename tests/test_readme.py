"""The README's Python examples run as written, each on its own, in a folder holding fvq.engine,
gen.engine, photo.png (the engine's training size) and scan.png (21 x 14 px, not a multiple of f),
and print what the test expects."""

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

# a line each example must print, keyed by a call that identifies the example
# (tiny_engine: 16 px images, f = 4, 4 x 4 tokens, K = 1024 codes of dimension 8)
EXPECTED = {
    "fullvq_rt.Codebook(": "[ 3 14 15]",
    'tok.encode("photo.png")': "(16, 16) (4, 4) (1024, 8) int32 uint8",
    "pad=True": "4 (4, 6) (14, 21, 3) [(2, 4), (3, 2)]",
    "fullvq_rt.Generator(": "(3, 16, 16, 3) uint8 3",
}


def expected_output(block: str) -> str:
    keys = [k for k in EXPECTED if k in block]
    assert len(keys) == 1, f"README example matches {keys or 'no'} expected output; update EXPECTED:\n{block}"
    return EXPECTED[keys[0]]


def test_readme_has_its_examples():
    assert len(BLOCKS) >= len(EXPECTED), "README lost examples"
    assert sorted(expected_output(b) for b in BLOCKS) == sorted(EXPECTED.values())


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(block, capsys, tmp_path, monkeypatch, tiny_engine, tiny_generator):
    from fullvq.data import default_photos

    shutil.copy(tiny_engine[1], tmp_path / "fvq.engine")
    shutil.copy(tiny_generator[0], tmp_path / "gen.engine")
    photo = default_photos()[2]
    photo.resize((16, 16)).save(tmp_path / "photo.png")
    photo.resize((21, 14)).save(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
    assert expected_output(block) in capsys.readouterr().out
