"""train/budget_study.py's report, from finished runs written as the study writes them: rows with
their budgets, the runs still to do, the plot, and a clear error for an unknown experiment."""

import json
import subprocess
import sys
from pathlib import Path

BUDGET_STUDY = str(Path(__file__).resolve().parents[1] / "train" / "budget_study.py")


def finished(folder: Path, quantizer: str, k: int, usage: tuple[float, float], dead: int, bridge: str | None) -> None:
    folder.mkdir(parents=True)
    curve = [{"tokens_per_code": density, "num_tokens": density * k, "usage": u, "dead_positions": dead}
             for density, u in zip((10, 50), usage, strict=True)]
    folder.joinpath("result.json").write_text(json.dumps({
        "quantizer": quantizer, "codebook_size": k, "usage_train_by_density": curve, "psnr": 37.5, "rfid": 80.25,
        "step_time_s": 1.5, "threads": 1, "bridge": bridge}))


def report(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BUDGET_STUDY, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_report_tables_finished_runs_with_their_budgets(tmp_path):
    budget = tmp_path / "docs" / "study" / "budget"
    finished(budget / "L8" / "runs" / "bridge-65536", "bridge", 65536, (0.7225, 0.7783), 11, "L/8")
    finished(budget / "L8-rule" / "runs" / "bridge-65536", "bridge", 65536, (0.9612, 0.985), 0, "L/8")
    done = report(tmp_path, "--report-only")
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "docs" / "study" / "usage_vs_budget.md").read_text()
    assert "| L8 | bridge L/8 | 65536 | 3000 x 32 | 94 | 72.2% | 77.8% | 11 | 37.50 | 80.2 | 1.50 s (1 thr) |" in table
    assert "| L8-rule | bridge L/8 | 65536 | 3000 x 128 | 375 | 96.1% | 98.5% | 0 |" in table
    assert "Not run yet: L8-rule bridge-262144" in table and "Not run yet: L8 bridge-65536" not in table
    assert table.index("| L8 |") < table.index("| L8-rule |")  # K, then quantizer, then budget
    rows = json.loads((tmp_path / "docs" / "study" / "usage_vs_budget.json").read_text())
    assert [(r["experiment"], r["train_tokens_per_code"]) for r in rows] == [("L8", 93.75), ("L8-rule", 375.0)]
    assert (tmp_path / "docs" / "study" / "usage_vs_budget.png").stat().st_size > 0


def test_unknown_experiment_is_named_with_the_known_ones(tmp_path):
    wrong = report(tmp_path, "--only", "L16")
    assert wrong.returncode != 0 and "unknown experiments ['L16']" in wrong.stderr and "'L8-batch256'" in wrong.stderr
    assert not (tmp_path / "docs").exists()
