"""Long jobs survive a kill: train/fvq.py, train/gpt.py and a train/study.py cell are SIGKILLed at
seeded moments, inside checkpoint writes included, resumed each time, and end bit-identical to an
uninterrupted run (one thread each); a full disk and an unwritable --out fail clearly, in time, and
harm nothing.

How a kill lands inside a write: the child runs under SHIM, which makes one write hang, as a hung disk
would (the n-th torch.save of the process after its first STALL_BYTES bytes, or the fsync of metrics.json
or result.json), and names the hanging temporary file in a marker file; the test waits for the marker
and sends SIGKILL from outside. Nothing in fullvq knows about it.
"""

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fullvq import checkpoint

ROOT = Path(__file__).resolve().parents[1]
FVQ, GPT, STUDY = (str(ROOT / "train" / name) for name in ("fvq.py", "gpt.py", "study.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STALL_BYTES = 4096
SHIM = f"""
import os, runpy, sys, time
import torch
torch.set_num_threads(1)
stall_save = int(os.environ.get("CRASH_TEST_STALL_SAVE", "0"))
stall_fsync = os.environ.get("CRASH_TEST_STALL_FSYNC", "")


def stall(fd):  # tells the test which file hangs, then hangs until killed
    with open(os.environ["CRASH_TEST_STALLED"] + ".part", "w") as marker:
        marker.write(os.readlink(f"/proc/self/fd/{{fd}}"))
    os.replace(os.environ["CRASH_TEST_STALLED"] + ".part", os.environ["CRASH_TEST_STALLED"])
    time.sleep(600)


if stall_save:  # the n-th torch.save of this process hangs after its first {STALL_BYTES} bytes, until killed
    calls, real_save = [0], torch.save

    class Stalling:
        def __init__(self, f):
            self.f, self.written = f, 0
        def write(self, data):
            n = self.f.write(data)
            self.written += len(memoryview(data).cast("B"))
            if self.written >= {STALL_BYTES}:
                self.f.flush()
                stall(self.f.fileno())
            return n
        def flush(self):
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        return real_save(obj, Stalling(f) if calls[0] == stall_save and hasattr(f, "write") else f, *args, **kwargs)

    torch.save = save
if stall_fsync:  # fsync of a file named .<stall_fsync>.*.tmp hangs (written in full, not yet renamed), until killed
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}")).startswith("." + stall_fsync + "."):
            stall(fd)
        return real_fsync(fd)

    os.fsync = fsync
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL, /proc and RLIMIT_FSIZE: Linux")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from fullvq.data import default_photos

    folder = tmp_path_factory.mktemp("photos")
    for i, photo in enumerate(default_photos()[:2]):
        photo.resize((64, 48)).save(folder / f"{i}.png")
    return folder


def launch(argv, logs: Path, name: str, stall_save: int = 0, stall_fsync: str = "", preexec_fn=None):
    """`python <script> args` under SHIM, stdout and stderr into logs/<name>.out|.err."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**ENV, "CRASH_TEST_STALL_SAVE": str(stall_save), "CRASH_TEST_STALL_FSYNC": stall_fsync,
           "CRASH_TEST_STALLED": str(logs / f"{name}.stalled")}
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-c", SHIM, *map(str, argv)], stdout=out, stderr=err, env=env,
                                cwd=logs, preexec_fn=preexec_fn)


def finish(proc: subprocess.Popen, logs: Path, name: str, timeout: float = 600) -> None:
    assert proc.wait(timeout) == 0, (logs / f"{name}.err").read_text()[-3000:]


def temps(folder: Path, name: str = "ckpt.pt") -> set[Path]:
    """The temporary files of writes of `name` in `folder` (written, or left by a kill)."""
    return set(folder.glob(f".{name}.*.tmp"))


def log_lines(folder: Path) -> list[str]:
    path = folder / "log.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def inode(path: Path) -> int | None:
    return path.stat().st_ino if path.exists() else None


def logged_step(folder: Path) -> int:
    """The last step in the log, 0 for none (a line being written now, or torn, does not count)."""
    steps = [0]
    for line in log_lines(folder):
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return max(steps)


def wait_for(condition, proc, logs: Path, name: str, what: str, timeout: float = 300):
    started = time.monotonic()
    while not (found := condition()):
        if proc.poll() is not None:
            err = (logs / f"{name}.err").read_text()[-3000:]
            pytest.fail(f"{name} exited ({proc.returncode}) before {what}:\n{err}")
        if time.monotonic() - started > timeout:
            proc.kill()
            pytest.fail(f"{name}: no {what} after {timeout} s")
        time.sleep(0.005)
    return found


def train_with_kills(fresh: list, resume: list, folder: Path, logs: Path, rng: np.random.Generator, steps: int,
                     kinds: list[str], final_file: str = "metrics.json", ckpt_every: int = 2,
                     torn_after: int = 1) -> list[tuple[int, str]]:
    """Runs `fresh` (or `resume` once folder/ckpt.pt exists), SIGKILLs it once per entry of `kinds`, then runs it
    to the end. Each kill but "end" is aimed at a step drawn from `rng` (distinct, ascending): "write" lands inside
    the first checkpoint write at or after it (a partial temporary file), "step" right after the log shows it;
    "end" comes after training, inside the write of `final_file` (written in full, not yet renamed). After kill
    `torn_after` the log gets a line cut short, as a full disk (or a power cut) in mid-write leaves one.
    -> [(the step the killed process started from, where the kill landed)]."""
    targets = iter(sorted(rng.choice(np.arange(2, steps - 1), size=kinds.count("write") + kinds.count("step"),
                                     replace=False).tolist()))
    history, last_step = [], 0
    for i, kind in enumerate(kinds):
        ckpt, log = folder / "ckpt.pt", folder / "log.jsonl"
        name, argv = f"kill{i}-{kind}", resume if ckpt.is_file() else fresh
        if kind == "step":
            target, old_log = max(next(targets), last_step + 1), inode(log)
            proc = launch(argv, logs, name)  # its log is the one it rewrote on start (a new inode), not the old one
            wait_for(lambda log=log, old=old_log, target=target: inode(log) != old and logged_step(folder) >= target,
                     proc, logs, name, f"step {target}")
            time.sleep(rng.uniform(0, 0.05))
            what = f"in training, after step {target}"
        else:
            if kind == "write":
                file, nth = "ckpt.pt", max(1, -(-(next(targets) - last_step) // ckpt_every))
                what = f"inside the checkpoint write of step {last_step + nth * ckpt_every}"
            else:
                file, nth, what = final_file, 0, f"after training, inside the write of {final_file}"
            proc = launch(argv, logs, name, stall_save=nth, stall_fsync="" if nth else final_file)
            marker = logs / f"{name}.stalled"
            wait_for(marker.is_file, proc, logs, name, f"the stalled write of {file}")
            partial = Path(marker.read_text())
            assert partial.parent == folder and partial.name.startswith(f".{file}.") and partial.name.endswith(".tmp")
            assert partial.stat().st_size >= (STALL_BYTES if nth else 1)
            time.sleep(rng.uniform(0, 0.1))
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        if kind != "step":
            assert partial.is_file()  # the kill landed inside the write: its temporary file is left
        history.append((last_step, what))
        if ckpt.is_file():  # whatever was interrupted, the last complete checkpoint loads
            step = checkpoint.load(ckpt)["step"]
            assert step >= last_step
            last_step = step
        lines = log_lines(folder)
        assert all(json.loads(line) for line in lines)  # a SIGKILL alone never tears a line
        if i == torn_after and lines:
            with open(log, "a") as f:
                f.write('{"step": 99, "loss": 0.12')
    proc = launch(resume if (folder / "ckpt.pt").is_file() else fresh, logs, "final")
    finish(proc, logs, "final")
    assert not list(folder.glob(".*.tmp")), "a killed write's temporary file outlived the resumed run"
    print("\n".join(f"kill {i}: started at step {start}, killed {what}" for i, (start, what) in enumerate(history)))
    assert len({start for start, _ in history if start > 0}) >= 3  # kills hit runs resumed from 3 checkpoints or more
    return history


def assert_same_checkpoint(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert {**a["config"], "out": ""} == {**b["config"], "out": ""}
    for part in ("model", "ema"):
        assert (part in a) == (part in b)
        for key in a.get(part, {}):
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), f"optimizer.state[{i}].{key}"
    assert ("rng" in a) == ("rng" in b) and torch.equal(a.get("rng", torch.zeros(1)), b.get("rng", torch.zeros(1)))


def without(record: dict, *keys) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


@pytest.mark.slow
def test_fvq_killed_six_times_ends_bit_identical(tmp_path, photo_dir):
    rng = np.random.default_rng(19)
    steps = 24
    args = ["--data", photo_dir, "--image-size", "16", "--batch-size", "4", "--codebook-size", "256", "--bridge",
            "XS/4", "--steps", steps, "eval_crops=8", "ema_decay=0.9", "model.dropout=0.1", "log_every=1",
            "ckpt_every=2"]  # dropout: the weights depend on the RNG state a resumed run restores
    reference = launch([FVQ, *args, "--out", tmp_path / "straight"], tmp_path / "logs", "straight")
    kinds = [*rng.permutation(["write", "write", "write", "step", "step"]), "end"]
    killed = tmp_path / "killed"
    history = train_with_kills([FVQ, *args, "--out", killed], [FVQ, "--out", killed, "--resume"], killed,
                               tmp_path / "logs", rng, steps, kinds)
    finish(reference, tmp_path / "logs", "straight")
    assert len(history) == 6 and sum("checkpoint write" in what for _, what in history) == 3, history
    a, b = (checkpoint.load(tmp_path / run / "ckpt.pt") for run in ("straight", "killed"))
    assert a["step"] == steps and "ema" in a
    assert_same_checkpoint(a, b)
    assert log_lines(tmp_path / "killed") == log_lines(tmp_path / "straight")  # the torn line dropped, none doubled
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("straight", "killed")]
    assert without(metrics[0], "step_time_s") == without(metrics[1], "step_time_s")


@pytest.mark.slow
def test_gpt_killed_five_times_ends_bit_identical(tmp_path):
    from test_gpt_training import write_pattern_codes

    codes = write_pattern_codes(tmp_path / "codes")
    rng = np.random.default_rng(1919)
    steps = 24
    args = ["--codes", codes, "--steps", steps, "--batch-size", "4", "model.dim=32", "model.n_layer=2",
            "model.n_head=2", "log_every=1", "ckpt_every=2"]  # dropouts on: their masks must repeat too
    reference = launch([GPT, *args, "--out", tmp_path / "straight"], tmp_path / "logs", "straight")
    kinds = [*rng.permutation(["write", "write", "step", "step"]), "end"]
    killed = tmp_path / "killed"
    history = train_with_kills([GPT, *args, "--out", killed], [GPT, "--out", killed, "--resume"], killed,
                               tmp_path / "logs", rng, steps, kinds)
    finish(reference, tmp_path / "logs", "straight")
    assert len(history) == 5, history
    a, b = (checkpoint.load(tmp_path / run / "ckpt.pt") for run in ("straight", "killed"))
    assert a["step"] == steps and a["kind"] == "gpt"
    assert_same_checkpoint(a, b)
    logs = [[without(json.loads(line), "step_time_s") for line in log_lines(tmp_path / run)]
            for run in ("straight", "killed")]
    assert logs[0] == logs[1] and [e["step"] for e in logs[1]] == list(range(1, steps + 1))
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("straight", "killed")]
    assert without(metrics[0], "step_time_s") == without(metrics[1], "step_time_s")


@pytest.mark.slow
def test_study_cell_killed_five_times_ends_bit_identical(tmp_path, photo_dir):
    rng = np.random.default_rng(191919)
    steps = 24

    def study(out):
        return [STUDY, "--quick", "--out", out, "--sizes", "64", "--quantizers", "vq", "--steps", steps,
                "--metric-images", "4", "--data", photo_dir, "image_size=16", "batch_size=4", "log_every=1",
                "ckpt_every=2"]

    reference = launch(study(tmp_path / "straight"), tmp_path / "logs", "straight")
    kinds = [*rng.permutation(["write", "write", "step", "step"]), "end"]  # "end": after the study's evaluation
    cell = tmp_path / "killed" / "runs" / "vq-64"
    history = train_with_kills(study(tmp_path / "killed"), study(tmp_path / "killed"), cell, tmp_path / "logs", rng,
                               steps, kinds, final_file="result.json")
    finish(reference, tmp_path / "logs", "straight")
    assert len(history) == 5, history
    straight = tmp_path / "straight" / "runs" / "vq-64"
    assert_same_checkpoint(checkpoint.load(straight / "ckpt.pt"), checkpoint.load(cell / "ckpt.pt"))
    assert log_lines(cell) == log_lines(straight)
    results = [json.loads((run / "result.json").read_text()) for run in (straight, cell)]
    assert results[0]["steps"] == steps
    assert without(results[0], "step_time_s") == without(results[1], "step_time_s")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_disk_while_saving_says_so_and_keeps_the_previous_checkpoint(tmp_path, photo_dir):
    out = tmp_path / "run"
    args = ["--data", photo_dir, "--image-size", "16", "--batch-size", "4", "--codebook-size", "256", "--bridge",
            "XS/4", "eval_crops=8", "log_every=1", "ckpt_every=2"]
    finish(launch([FVQ, *args, "--out", out, "--steps", "2"], tmp_path / "logs", "first"), tmp_path / "logs", "first")
    ckpt = out / "ckpt.pt"
    stamp, limit = sha256(ckpt), ckpt.stat().st_size // 2

    def small_files():  # as a full disk: write() fails with EFBIG (SIGXFSZ ignored) past half a checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = launch([FVQ, "--out", out, "--resume", "--steps", "4"], tmp_path / "logs", "full", preexec_fn=small_files)
    assert proc.wait(600) != 0
    err = (tmp_path / "logs" / "full.err").read_text()
    message = next((line for line in err.splitlines() if "CheckpointWriteError: " in line), err[-3000:])
    assert "cannot write the checkpoint" in message and str(ckpt) in message, message
    assert "File too large" in message and "MiB free" in message and "ulimit -f" in message
    assert "still holds the previous checkpoint" in message and "--resume" in message
    assert sha256(ckpt) == stamp and checkpoint.load(ckpt)["step"] == 2
    assert not temps(out)
    assert [json.loads(line)["step"] for line in log_lines(out)] == [1, 2, 3, 4]  # the steps it trained were logged


def test_checkpoint_write_failure_names_the_space_and_removes_its_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"step": 1, "model": {"w": torch.zeros(10)}})
    stamp = sha256(path)

    def no_space(obj, f, *args, **kwargs):  # a disk that fills up half-way through the write
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device") as failure:
        checkpoint.save(path, {"step": 2, "model": {"w": torch.zeros(2**18)}})
    assert isinstance(failure.value, OSError) and "about 1.0 MiB" in str(failure.value)
    assert "still holds the previous checkpoint" in str(failure.value)
    assert sha256(path) == stamp and not temps(tmp_path)
    with pytest.raises(checkpoint.CheckpointWriteError, match="no earlier checkpoint exists"):
        checkpoint.save(tmp_path / "new" / "ckpt.pt", {"step": 1})

    def bug(obj, f, *args, **kwargs):
        raise RuntimeError("not a disk problem")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="not a disk problem"):  # other failures are not dressed up as disk ones
        checkpoint.save(path, {"step": 3})


def test_torn_log_lines_are_dropped_on_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n\n{"step": 3}\n{"step": 4, "lo')
    checkpoint.truncate_log(log, 3)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    log.write_text('{"step": 1}\n{"step": 2}')  # complete, only its newline lost
    checkpoint.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    checkpoint.truncate_log(log, 0)
    assert log.read_text() == "" and not temps(tmp_path)


def unwritable_outs(tmp_path: Path) -> list:
    """--out folders that cannot be written: below a regular file (for everyone, root included), and inside a
    read-only folder (only where permissions bind: not for root)."""
    (tmp_path / "a-file").write_text("not a folder")
    outs = [tmp_path / "a-file" / "run"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").write_text("")
        (locked / "probe").unlink()
        binds = False  # root (CAP_DAC_OVERRIDE) writes regardless
    except PermissionError:
        binds = True
    if binds:
        outs.append(locked / "run")
    return outs


def test_unwritable_out_fails_before_training(tmp_path, photo_dir, monkeypatch):
    from fullvq import gpt_trainer, trainer
    from fullvq.config import preset
    from fullvq.gpt_config import gpt_preset
    from test_gpt_training import write_pattern_codes

    def no_training(*args, **kwargs):
        raise AssertionError("training began: the run folder was not checked first")

    monkeypatch.setattr(trainer, "build_model", no_training)
    monkeypatch.setattr(gpt_trainer, "GPT", no_training)
    codes = write_pattern_codes(tmp_path / "codes")
    outs = unwritable_outs(tmp_path)
    if os.geteuid() == 0:
        assert len(outs) == 1  # as root a chmod 0o500 folder stays writable: only the regular-file case applies
    for out in outs:
        cfg = preset("tiny")
        cfg.out, cfg.data, cfg.image_size, cfg.batch_size = str(out), str(photo_dir), 16, 4
        with pytest.raises(OSError, match=r"cannot write to the run folder --out .*Pass an --out you can write to"):
            trainer.train(cfg)
        gcfg = gpt_preset("tiny")
        gcfg.out, gcfg.codes = str(out), str(codes)
        with pytest.raises(OSError, match=r"cannot write to the run folder --out .*nothing was trained"):
            gpt_trainer.train(gcfg)
        assert not out.exists()
    (tmp_path / "locked").chmod(0o700)


def test_resume_with_dropout_is_bit_identical(tmp_path, photo_dir):
    """Starting the data loader's iterator draws from torch's RNG: a resumed run restores the checkpoint's RNG
    state after that draw, or every dropout mask after a resume differs from the uninterrupted run's."""
    from fullvq.config import apply_override, preset
    from fullvq.trainer import train

    def config(name):
        cfg = preset("tiny")
        cfg.out, cfg.data, cfg.steps, cfg.batch_size, cfg.image_size = str(tmp_path / name), str(photo_dir), 4, 4, 16
        cfg.quantizer.codebook_size, cfg.quantizer.bridge, cfg.eval_crops, cfg.log_every = 256, "XS/4", 8, 2
        apply_override(cfg, "model.dropout=0.1")
        return cfg

    train(config("straight"))
    assert train(config("resumed"), stop_at=2) is None
    train(config("resumed"), resume=True)
    a, b = (checkpoint.load(tmp_path / name / "ckpt.pt") for name in ("straight", "resumed"))
    assert_same_checkpoint(a, b)
