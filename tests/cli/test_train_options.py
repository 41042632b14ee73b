"""``train`` refuses bad options and unusable folders in one line, exit 2, before any data loads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from _train_helpers import ROOT

from torch_backprop.cli import main, train
from torch_backprop.cli.command import build_parser

FAKE = ["train", "--dataset", "fake", "--fake-size", "64", "--hidden", "8", "--batch-size", "32"]


def command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch_backprop", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--lr", "-1", "expected a finite number > 0"),
        ("--lr", "0", "expected a finite number > 0"),
        ("--lr", "nan", "expected a finite number > 0"),
        ("--lr", "inf", "expected a finite number > 0"),
        ("--dropout", "1.5", "expected a finite number >= 0 and < 1"),
        ("--dropout", "-0.1", "expected a finite number >= 0 and < 1"),
        ("--dropout", "1", "expected a finite number >= 0 and < 1"),
        ("--dropout", "nan", "expected a finite number >= 0 and < 1"),
        ("--weight-decay", "-1", "expected a finite number >= 0"),
        ("--momentum", "-1", "expected a finite number >= 0"),
        ("--lr-gamma", "0", "expected a finite number > 0"),
        ("--workers", "-1", "expected an integer >= 0"),
        ("--lr-step-size", "0", "expected an integer >= 1"),
        ("--limit-train", "-5", "expected an integer >= 1"),
        ("--limit-test", "-5", "expected an integer >= 1"),
        ("--fake-size", "-10", "expected an integer >= 1"),
        ("--epochs", "0", "expected an integer >= 1"),
        ("--batch-size", "0", "expected an integer >= 1"),
        ("--epochs", "1.5", "expected an integer >= 1"),
        ("--hidden", "", "expected one or more widths such as 256,128"),
        ("--hidden", "64,0", "expected positive widths (0 is not)"),
        ("--hidden", "64,x", "expected widths as comma-separated integers such as 256,128"),
    ],
)
def test_out_of_range_options_are_one_line_before_any_data(
    option, value, expected, no_data, tmp_path, capsys
):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main([*FAKE, option, value, "--out", str(out)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {expected}, got {value!r}" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("option", ["--rtol", "--atol"])
def test_verify_refuses_negative_tolerances(option, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["verify", option, "-1"])
    assert exited.value.code == 2
    assert f"argument {option}: expected a finite number >= 0, got '-1'" in capsys.readouterr().err


def test_a_bad_option_from_the_command_line_is_one_message_without_traceback(tmp_path):
    result = command(*FAKE, "--lr", "nan", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (  # one line, without argparse's usage block
        "torch-backprop train: argument --lr: expected a finite number > 0, got 'nan' "
        "(see torch-backprop train --help)\n"
    )


def test_out_naming_a_file_or_below_a_file_is_refused_before_any_data(no_data, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    assert main([*FAKE, "--out", str(file)]) == 2
    assert f"--out expected a folder, got the file {file}" in capsys.readouterr().err
    assert main([*FAKE, "--out", str(file / "run")]) == 2
    assert f"below the file {file}" in capsys.readouterr().err
    assert file.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_any_data(no_data, tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main([*FAKE, "--out", str(folder / "run")]) == 2
    finally:
        folder.chmod(0o755)
    assert "--out expected a writable folder" in capsys.readouterr().err


def test_resume_from_a_missing_folder_is_refused(no_data, tmp_path, capsys):
    assert main([*FAKE, "--resume", str(tmp_path / "nowhere")]) == 2
    assert "--resume expected the folder of a run" in capsys.readouterr().err


def test_a_failed_run_leaves_no_empty_out_folder(tmp_path, monkeypatch, capsys):
    from torch_backprop.cli.data import DataError

    def offline(*args, **kwargs):
        raise DataError("cannot load dataset 'mnist': offline")

    monkeypatch.setattr(train, "load_dataset", offline)
    out = tmp_path / "new" / "run"
    assert main(["train", "--out", str(out)]) == 2
    assert "offline" in capsys.readouterr().err
    assert not out.exists()


def test_version_and_help_read_as_plain_text(capsys):
    from torch_backprop import __version__

    for args in (["--version"], ["--help"], ["train", "--help"], ["verify", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 0
        printed = capsys.readouterr().out
        assert "``" not in printed and ":mod:" not in printed
        if args == ["--version"]:
            assert printed.strip() == f"torch-backprop {__version__}"
        else:
            assert printed.startswith("usage: torch-backprop")


@pytest.mark.parametrize("value", ["1e-3", "0.5"])
def test_valid_values_pass_the_types(value, tmp_path):
    out = tmp_path / "run"
    assert main([*FAKE, "--epochs", "1", "--lr", value, "--dropout", "0.5", "--out", str(out)]) == 0
    assert torch.load(out / "model.pt", weights_only=True)["layers.0.weight"].shape == (8, 784)


def test_without_out_a_run_writes_into_a_new_run_folder_and_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        train.time, "localtime", lambda now=None: time.struct_time((2026, 12, 7, 9, 5, 3, 0, 341, 0))
    )
    assert main([*FAKE, "--epochs", "1"]) == 0
    out = tmp_path / "runs" / "fake-20261207-090503"
    assert capsys.readouterr().out.startswith(
        "no --out given: the run's files go to runs/fake-20261207-090503\n"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "curves.png",
        "metrics.json",
        "model.pt",
    ]
    assert main([*FAKE, "--epochs", "1"]) == 0  # the same second: a new folder beside it, not a refusal
    assert "runs/fake-20261207-090503-2\n" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing else written


def test_abbreviations_are_not_options(no_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*FAKE, "--ep", "1", "--out", str(tmp_path / "run")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "torch-backprop train: unrecognized arguments: --ep 1 (see torch-backprop train --help)\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "hidden", [["16,8"], ["16-8"], ["16", "8"], ["16 8"]], ids=["commas", "dashes", "spaces", "quoted"]
)
def test_widths_are_read_in_each_way_users_write_them(hidden):
    _, subcommands = build_parser(["train"])
    assert subcommands["train"].parse_args(["--hidden", *hidden]).hidden == [16, 8]
