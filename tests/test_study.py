"""train/study.py, smoke-tested at toy size: every run trained, evaluated, tabled and plotted, and
a second call reuses the finished runs."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fullvq.study import Plan, StudyError, check_comparable, planned_config, tabulated

STUDY = str(Path(__file__).resolve().parents[1] / "train" / "study.py")


def test_quick_study_runs_and_resumes(tmp_path):
    out = tmp_path / "study"
    def args(steps=2):
        return [sys.executable, STUDY, "--quick", "--out", str(out), "--sizes", "64,96", "--quantizers", "vq,bridge",
                "--steps", str(steps), "--metric-images", "8", "image_size=16", "batch_size=4"]

    first = subprocess.run(args(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(r["quantizer"], r["codebook_size"]) for r in results] == [("vq", 64), ("bridge", 64), ("vq", 96),
                                                                       ("bridge", 96)]
    for r in results[:3]:
        assert {"usage", "usage_train", "num_tokens", "psnr", "ssim", "lpips", "rfid", "step_time_s", "steps"} <= set(r)
        assert 0 < r["usage"] <= 1 and r["steps"] == 2 and r["rfid"] >= 0
        curve, k = r["usage_train_by_density"], r["codebook_size"]
        assert [(c["tokens_per_code"], c["num_tokens"]) for c in curve] == [(10, 10 * k), (50, 50 * k)]
        assert r["usage_train"] == curve[0]["usage"] <= curve[1]["usage"]
        assert r["lpips"] is None and "smaller than LPIPS-alex" in r["unavailable"]["lpips"]  # 16 px tiles
    assert "not a perfect square" in results[3]["skipped"]  # K = 96 cannot be a bridge grid: recorded, not fatal
    table = (out / "results.md").read_text()
    assert "| bridge B/8 | 64 |" in table and "python train/study.py --quick" in table
    assert (out / "usage_vs_k.png").is_file() and (out / "psnr_vs_k.png").is_file()
    one_cell = subprocess.run(args() + ["--sizes", "64", "--quantizers", "vq"], capture_output=True, text=True,
                              timeout=900)  # a study run cell by cell keeps one report of all its cells
    assert one_cell.returncode == 0, one_cell.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == results
    command = (out / "results.md").read_text().splitlines()[0]
    assert "--sizes 64,96 --steps 2 " in command and "--quantizers" not in command  # vq,bridge: --quick's

    ckpt = out / "runs" / "vq-64" / "ckpt.pt"
    stamp = ckpt.stat().st_mtime_ns
    again = subprocess.run(args(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and ckpt.stat().st_mtime_ns == stamp  # finished runs are not redone
    (out / "runs" / "vq-64" / "result.json").unlink()  # as if the evaluation had been interrupted
    again = subprocess.run(args(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and ckpt.stat().st_mtime_ns == stamp  # evaluated again, not retrained
    assert (out / "runs" / "vq-64" / "result.json").is_file()

    result_file = out / "runs" / "bridge-64" / "result.json"
    full = json.loads(result_file.read_text())
    result_file.write_text(json.dumps(full | {"usage_train_by_density": full["usage_train_by_density"][:1]}))
    report = subprocess.run(args() + ["--sizes", "64,128", "--report-only"], capture_output=True, text=True,
                            timeout=900)
    assert report.returncode == 0 and not (out / "runs" / "vq-128").exists()  # nothing trained
    assert len(json.loads(result_file.read_text())["usage_train_by_density"]) == 1  # nor measured
    table = (out / "results.md").read_text()
    assert "| vq | 64 | " in table and "| vq | 128 | not run yet" in table
    assert "| bridge | 128 | bridge codebook size 128 is not a perfect square" in table  # why, even unrun
    assert f"| bridge B/8 | 64 | {full['usage_train']:.1%} | n/a |" in table  # as if measured by an earlier version
    again = subprocess.run(args(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "usage_train at 50 tokens per code" in again.stdout
    assert json.loads(result_file.read_text()) == full  # the missing density measured again, the same
    no_positions = [{k: v for k, v in c.items() if k != "dead_positions"} for c in full["usage_train_by_density"]]
    result_file.write_text(json.dumps(full | {"usage_train_by_density": no_positions}))  # as fullvq 0.1 wrote it
    again = subprocess.run(args(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and json.loads(result_file.read_text()) == full  # its dead positions counted
    other = subprocess.run(args(steps=3), capture_output=True, text=True, timeout=900)
    assert other.returncode != 0 and "use another --out" in other.stderr
    result_file.write_text(json.dumps(full | {"bridge": "W128-H2-D2/8"}))  # a run of another bridge
    other = subprocess.run(args(), capture_output=True, text=True, timeout=900)
    assert other.returncode != 0
    assert "holds a finished run of the bridge W128-H2-D2/8, this study trains B/8" in other.stderr


def test_report_says_how_far_an_unfinished_run_got(tmp_path):
    plan = Plan(out=tmp_path, sizes=[1024], quantizers=["vq", "fc"], steps=300)
    folder = plan.run_dir("vq", 1024)
    folder.mkdir(parents=True)
    lines = [{"step": 50, "usage": 0.5, "psnr": 20.0}, {"step": 100, "usage": 0.01234, "psnr": 25.678}]
    (folder / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 150, "us')  # a kill
    vq, fc = tabulated(plan)[1]
    assert vq["skipped"] == ("unfinished, step 100 of 300 (no checkpoint here: starts over): its last 50 steps used "
                             "1.23% of the codes, training PSNR 25.68")
    assert fc["skipped"] == "not run yet"
    (folder / "ckpt.pt").write_bytes(b"")
    assert "step 100 of 300 (resumes from its checkpoint)" in tabulated(plan)[1][0]["skipped"]


def test_budget_rule_grows_the_batch_in_whole_multiples(tmp_path):
    # 3000 steps x 32 crops x 64 tokens: 93.75 training tokens per code at 65,536 codes
    plan = Plan(out=tmp_path, sizes=[], quantizers=[], steps=3000, min_train_tokens_per_code=90)
    assert [planned_config(plan, "bridge", k).batch_size for k in (1024, 65536, 262144)] == [32, 32, 128]
    assert planned_config(replace(plan, min_train_tokens_per_code=100), "simvq", 65536).batch_size == 64
    assert planned_config(replace(plan, overrides=["batch_size=48"]), "vq", 262144).batch_size == 144  # 35.2 x 3
    assert planned_config(replace(plan, min_train_tokens_per_code=0), "vq", 262144).batch_size == 32
    finished = {"quantizer": "simvq", "codebook_size": 262144, "steps": 3000, "batch_size": 32, "bridge": None}
    with pytest.raises(StudyError, match="3000 steps x 32 crops, this study asks for 3000 x 128: use another --out"):
        check_comparable(plan, finished)
    check_comparable(plan, finished | {"batch_size": 128})
    with pytest.raises(StudyError, match="before the study recorded batch sizes"):
        check_comparable(plan, {k: v for k, v in finished.items() if k != "batch_size"})
