"""The ``bench`` command: it prints times and ratios (never targets) and writes the JSON and the chart."""

from __future__ import annotations

import json
import os

import pytest
import torch
from benchmark_checks import check_report, check_table

from torch_backprop.cli import bench, main
from torch_backprop.cli.bench_report import format_table, impossible_ratios, plot_ratios


def test_command_line_prints_the_table_and_writes_json_and_plot(tmp_path, capsys) -> None:
    json_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    argv = [
        "bench",
        *("--cases", "8-16-16-1@32", "--activations", "tanh", "--rounds", "1", "--min-run-time", "0.001"),
        *("--threads", "1", "--no-compile", "--timer", "cpu", "--json", str(json_path)),
    ]
    pytest.importorskip("matplotlib")
    assert main([*argv, "--plot", str(plot_path)]) == 0
    report = json.loads(json_path.read_text())
    check_report(report, cases=1, compiled=False)
    out = capsys.readouterr().out
    check_table(out, report)
    assert report["cases"][0]["name"] == "8-16-16-1@32 tanh float32"
    assert report["settings"]["timer"] == "cpu"
    assert "target" not in out.lower() and "bound" not in out.lower()  # results, not a verdict
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.png"]  # no temporary files left


def test_table_and_plot_of_a_report(tmp_path) -> None:
    settings = bench.Settings(
        shapes=[((8, 16, 10), 16)],
        activations=["relu", "gelu"],
        rounds=2,
        min_run_time=1e-3,
        compile=False,
        threads=1,
    )
    report = bench.run_benchmark(settings)
    check_table(format_table(report), report)
    pytest.importorskip("matplotlib")
    plot_ratios(report, tmp_path / "deep" / "ratios.png")
    assert (tmp_path / "deep" / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _no_work(*args, **kwargs):
    raise AssertionError("the benchmark ran before every option was checked")


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--dtypes", "float8"],
            "argument --dtypes: expected comma-separated dtypes from float32, bfloat16, float16, "
            "got 'float8'",
        ),
        (["--rounds", "0"], "argument --rounds: expected an integer >= 1, got '0'"),
        (["--threads", "-1"], "argument --threads: expected an integer >= 1, got '-1'"),
        (["--min-run-time", "0"], "argument --min-run-time: expected a finite number > 0, got '0'"),
        (
            ["--activations", "nope"],
            "argument --activations: expected comma-separated activations from elu, ",
        ),
        (
            ["--cases", "784@64"],
            "argument --cases: expected each case's widths as two or more positive integers",
        ),
        (["--rounds", "1", "--rou", "2"], "unrecognized arguments: --rou 2"),
    ],
    ids=["dtype", "rounds", "threads", "min-run-time", "activation", "cases", "abbreviation"],
)
def test_bad_values_are_one_line_and_status_2_before_any_work(options, message, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "run_benchmark", _no_work)
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--quick", "--no-compile", *options])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"torch-backprop bench: {message}")
    assert err.endswith(" (see torch-backprop bench --help)\n") and err.count("\n") == 1


def test_a_bad_device_is_one_line_and_status_2_before_any_work(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "run_benchmark", _no_work)
    assert main(["bench", "--quick", "--device", "tpu"]) == 2
    assert (
        capsys.readouterr().err
        == "torch-backprop bench: --device takes auto, cpu, cuda or cuda:N, got 'tpu'\n"
    )


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_paths_are_checked_before_any_work_and_no_folder_is_made(
    option, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(bench, "run_benchmark", _no_work)
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    cases = {
        str(
            file / "r.out"
        ): f"expected a file in an existing folder, got '{file / 'r.out'}' ({file} is a file)",
        str(tmp_path / "absent" / "r.out"): f"expected a file in an existing folder, got "
        f"'{tmp_path / 'absent' / 'r.out'}' (no folder {tmp_path / 'absent'})",
        str(tmp_path): f"expected a file name, got the folder '{tmp_path}'",
    }
    for path, message in cases.items():
        with pytest.raises(SystemExit) as exited:
            main(["bench", "--quick", option, path])
        assert exited.value.code == 2
        assert (
            capsys.readouterr().err
            == f"torch-backprop bench: argument {option}: {message} (see torch-backprop bench --help)\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and file.read_text() == "keep me"


def test_plot_without_matplotlib_is_refused_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "run_benchmark", _no_work)
    monkeypatch.setattr(bench, "module_available", lambda name: name != "matplotlib")
    assert main(["bench", "--quick", "--plot", str(tmp_path / "r.png")]) == 2
    assert capsys.readouterr().err == (
        f"torch-backprop bench: --plot {tmp_path / 'r.png'} needs matplotlib, which is not installed: "
        "pip install 'torch-backprop[plot]'\n"
    )


def test_help_explains_every_contender_and_the_larger_batches(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for name in bench.CONTENDERS:
        assert f"\n  {name} " in out, name
    assert "8x its batch" in out and "(the larger" in out


def test_cuda_without_cuda_is_refused(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "run_benchmark", _no_work)
    assert main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "--device cuda was asked for, but CUDA is not available here" in capsys.readouterr().err


def test_an_impossible_floor_ratio_is_warned_about(monkeypatch, capsys) -> None:
    settings = bench.Settings(
        shapes=[((8, 16, 10), 16), ((8, 8, 2), 4)],
        activations=["relu"],
        rounds=2,
        min_run_time=1e-3,
        compile=False,
    )
    report = bench.run_benchmark(settings)
    busy, quiet = report["cases"]
    busy["ratios"]["floor/manual"], quiet["ratios"]["floor/manual"] = 1.08, 0.5  # as seen under load
    warnings = impossible_ratios(report)
    assert len(warnings) == 1 and busy["name"] in warnings[0] and "1.080 > 1" in warnings[0]
    monkeypatch.setattr("torch_backprop.cli.bench.run_benchmark", lambda settings, log: report)
    assert main(["bench", "--quick"]) == 0
    err = capsys.readouterr().err
    assert f"torch-backprop bench: warning: {busy['name']}: floor/manual 1.080 > 1" in err
    assert quiet["name"] + ":" not in err
