"""``train``'s folder: resume with every schedule, corrupt checkpoints, the lock, --overwrite, kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import ROOT

from torch_backprop import BackpropMLP
from torch_backprop.cli import main, run_folder, train

FAKE = ["train", "--dataset", "fake", "--fake-size", "64", "--hidden", "8", "--batch-size", "16"]
SCHEDULES = {
    "constant": ["--lr-schedule", "constant"],
    "cosine": ["--lr-schedule", "cosine"],
    "step": ["--lr-schedule", "step", "--lr-step-size", "2", "--lr-gamma", "0.5"],
}


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def figures(out: Path) -> list[dict]:
    """Each epoch's row without its timings (which differ between any two runs)."""
    return [
        {k: v for k, v in row.items() if k not in ("seconds", "samples_per_second")}
        for row in metrics(out)["epochs"]
    ]


def assert_same_model(a: Path, b: Path) -> None:
    first = torch.load(a / "model.pt", weights_only=True)
    second = torch.load(b / "model.pt", weights_only=True)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def crash_after(epochs: int, monkeypatch) -> None:
    """The next run dies (KeyboardInterrupt) right after writing epoch ``epochs``'s files."""
    real_write = run_folder.write_epoch

    def write_then_die(out, trainees, history, config, epoch, device):
        real_write(out, trainees, history, config, epoch, device)
        if epoch == epochs:
            monkeypatch.setattr(run_folder, "write_epoch", real_write)
            raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "write_epoch", write_then_die)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_resume_after_a_crash_equals_an_uninterrupted_run(schedule, tmp_path, monkeypatch):
    options = [*FAKE, *SCHEDULES[schedule], "--dropout", "0.1", "--epochs", "4"]
    assert main([*options, "--out", str(tmp_path / "straight")]) == 0
    crash_after(2, monkeypatch)
    resumed = tmp_path / "resumed"
    assert main([*options, "--out", str(resumed)]) == 130
    assert len(metrics(resumed)["epochs"]) == 2
    assert main([*options, "--resume", str(resumed)]) == 0
    assert figures(resumed) == figures(tmp_path / "straight")  # learning rates and losses, per epoch
    assert_same_model(resumed, tmp_path / "straight")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_resume_with_grown_epochs_continues_the_schedule(schedule, tmp_path, capsys):
    options = [*FAKE, *SCHEDULES[schedule]]
    straight, grown = tmp_path / "straight", tmp_path / "grown"
    assert main([*options, "--epochs", "4", "--out", str(straight)]) == 0
    assert main([*options, "--epochs", "2", "--out", str(grown)]) == 0
    assert main([*options, "--epochs", "4", "--resume", str(grown)]) == 0
    lrs = [row["lr"] for row in metrics(grown)["epochs"]]
    reference = [row["lr"] for row in metrics(straight)["epochs"]]
    assert len(lrs) == 4 and lrs[2:] == reference[2:]  # epochs 3 and 4 run as in the 4-epoch run
    assert all(lr > 0 for lr in lrs)  # no epoch lost at the end of the first run's cosine
    if schedule == "cosine":  # the first run's horizon was 2 epochs: its epoch 2 had the rate of that
        assert lrs[:2] == pytest.approx([1e-3, 0.5e-3]) and reference == pytest.approx(
            [1e-3, 0.8535534e-3, 0.5e-3, 0.1464466e-3]
        )
    else:  # the schedule does not depend on --epochs: the whole run is the uninterrupted one
        assert figures(grown) == figures(straight)
        assert_same_model(grown, straight)


def test_resume_with_nothing_left_to_train_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAKE, "--epochs", "2", "--out", str(out)]) == 0
    before = figures(out)
    capsys.readouterr()
    assert main([*FAKE, "--epochs", "2", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed and "2 epoch(s) done" in printed and "--epochs 3" in printed
    assert "wrote" not in printed
    assert figures(out) == before
    (out / "curves.png").unlink()  # as when a kill cuts the last epoch's drawing short
    assert main([*FAKE, "--epochs", "2", "--resume", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 0


def test_resume_rewrites_model_and_metrics_that_lag_the_checkpoint(tmp_path, monkeypatch):
    out, lagging = tmp_path / "run", tmp_path / "epoch1"
    assert main([*FAKE, "--epochs", "1", "--out", str(out)]) == 0
    lagging.mkdir()
    for name in ("model.pt", "metrics.json"):
        (lagging / name).write_bytes((out / name).read_bytes())
    assert main([*FAKE, "--epochs", "2", "--resume", str(out)]) == 0
    for name in ("model.pt", "metrics.json"):  # as a kill right after checkpoint.pt leaves them
        (out / name).write_bytes((lagging / name).read_bytes())

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train_epoch", die)
    assert main([*FAKE, "--epochs", "3", "--resume", str(out)]) == 130  # dies before training epoch 3
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 2 and len(metrics(out)["epochs"]) == 2
    model = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], v) for k, v in saved["trainees"]["manual"]["model"].items())


def test_resume_into_another_folder_writes_all_three_files_of_the_checkpoint(tmp_path):
    source, copy = tmp_path / "source", tmp_path / "copy"
    assert main([*FAKE, "--epochs", "1", "--backend", "autograd", "--out", str(source)]) == 0
    assert (
        main([*FAKE, "--epochs", "1", "--backend", "autograd", "--resume", str(source), "--out", str(copy)])
        == 0
    )
    assert figures(copy) == figures(source)
    assert_same_model(copy, source)  # rebuilt from the twin's state in the checkpoint, BackpropMLP's keys
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "it is empty"),
        (bytes(random.Random(0).randrange(256) for _ in range(4096)), "not a torch.save file"),
        ("foreign", "not a train checkpoint"),
        ("truncated", "not a torch.save file"),
    ],
)
def test_a_corrupt_or_foreign_checkpoint_is_one_line(content, reason, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAKE, "--epochs", "1", "--out", str(out)]) == 0
    path = out / "checkpoint.pt"
    if content == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(content)
    capsys.readouterr()
    assert main([*FAKE, "--epochs", "2", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and reason in err and "file an issue" not in err


def test_a_second_run_into_a_folder_in_use_fails_at_once_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    with run_folder.RunFolder(out, resume=None, overwrite=False):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        started = time.perf_counter()
        assert main([*FAKE, "--epochs", "1", "--out", str(out)]) == 2
        assert time.perf_counter() - started < 5
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {os.getpid()}" in err
        assert [p.name for p in out.iterdir()] == [".lock"]  # the refused run wrote nothing
    assert not out.exists()  # the holder made the folder and wrote nothing: it leaves no empty folder


def test_a_stale_lock_file_and_killed_writes_are_cleared(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAKE, "--epochs", "1", "--out", str(out)]) == 0
    (out / ".lock").write_text("999999\n")  # left by a killed run: no process holds it
    litter = [out / ".model.pt.k1ll3d.tmp", out / ".checkpoint.pt.x.tmp", out / ".metrics.json.y.tmp"]
    for path in litter:
        path.write_bytes(b"half a file")
    (out / "mine.tmp").write_text("not the writer's")
    assert main([*FAKE, "--epochs", "2", "--resume", str(out)]) == 0
    assert not any(path.exists() for path in litter) and (out / "mine.tmp").exists()
    assert not (out / ".lock").exists()


def test_a_new_run_into_another_runs_folder_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAKE, "--epochs", "1", "--out", str(out)]) == 0
    kept = figures(out)
    capsys.readouterr()
    assert main([*FAKE, "--epochs", "2", "--hidden", "9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds another run's checkpoint.pt" in err and "--resume" in err and "--overwrite" in err
    assert figures(out) == kept
    assert main([*FAKE, "--epochs", "2", "--hidden", "9", "--out", str(out), "--overwrite"]) == 0
    assert metrics(out)["config"]["hidden"] == [9] and len(metrics(out)["epochs"]) == 2


def _command(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch_backprop", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _epochs_in_checkpoint(out: Path) -> int:
    try:
        return torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    except FileNotFoundError:
        return 0


def _check_every_file_loads(out: Path) -> None:
    done = _epochs_in_checkpoint(out)
    if (out / "metrics.json").exists():
        assert len(metrics(out)["epochs"]) in (done, done - 1)  # written after the checkpoint
    if (out / "model.pt").exists():
        state = torch.load(out / "model.pt", weights_only=True)
        BackpropMLP([784, 8, 10]).load_state_dict(state)


def test_sigterm_ends_the_run_cleanly_and_it_resumes(tmp_path):
    out = tmp_path / "run"
    process = _command(*FAKE, "--epochs", "500", "--out", str(out))
    deadline = time.monotonic() + 120
    while _epochs_in_checkpoint(out) < 2:
        assert time.monotonic() < deadline and process.poll() is None, "no epoch written"
        time.sleep(0.02)
    process.terminate()
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert "torch-backprop train: terminated" in process.stderr.read().decode()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "model.pt"]  # no lock
    _check_every_file_loads(out)
    assert main([*FAKE, "--epochs", str(_epochs_in_checkpoint(out) + 1), "--resume", str(out)]) == 0


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    options = [*FAKE, "--epochs", "40", "--optimizer", "sgd", "--lr", "0.05", "--lr-schedule", "cosine"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _command(*options, "--out", str(straight))
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
    chance, kills = random.Random(11), 0
    for _ in range(4):
        done = _epochs_in_checkpoint(killed)
        resume = ["--resume", str(killed)] if (killed / "checkpoint.pt").exists() else ["--out", str(killed)]
        process = _command(*options, *resume)
        deadline = time.monotonic() + 120
        while _epochs_in_checkpoint(killed) <= done and process.poll() is None:  # it has made progress
            assert time.monotonic() < deadline, "no epoch written"
            time.sleep(0.02)
        time.sleep(chance.uniform(0, 0.15))
        if process.poll() is not None:  # finished before the kill
            break
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        kills += 1
        _check_every_file_loads(killed)
    assert kills >= 2
    finish = _command(*options, "--resume", str(killed))
    assert finish.wait(timeout=300) == 0, finish.stderr.read().decode()[-2000:]
    assert figures(killed) == figures(straight)
    assert_same_model(killed, straight)
    assert _epochs_in_checkpoint(killed) == 40
    left = sorted(p.name for p in killed.iterdir())
    assert left == sorted(p.name for p in straight.iterdir()), left
