"""The README's Python examples run as written, in a folder holding fvq.engine, gen.engine and photo.png."""

import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys, tmp_path, monkeypatch, tiny_engine, tiny_generator):
    from fullvq.data import default_photos

    shutil.copy(tiny_engine[1], tmp_path / "fvq.engine")
    shutil.copy(tiny_generator[0], tmp_path / "gen.engine")
    default_photos()[2].resize((16, 16)).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its examples"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "[ 3 14 15]" in out
    assert "(16, 16) (4, 4) (1024, 8) int32 uint8" in out
    assert "(3, 16, 16, 3) uint8 3" in out
