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


@pytest.mark.parametrize(
    "options, message",
    [
        (["--dtypes", "float8"], "--dtypes takes float32, bfloat16, float16, got float8"),
        (["--rounds", "0"], "--rounds, --min-run-time and --threads must be positive"),
        (["--device", "tpu"], "--device takes auto, cpu, cuda or cuda:N, got 'tpu'"),
    ],
    ids=["dtype", "rounds", "device"],
)
def test_bad_options_are_one_line_and_status_2(options, message, capsys) -> None:
    assert main(["bench", "--quick", "--no-compile", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torch-backprop bench: ") and message in err and "Traceback" not in err


def test_cuda_without_cuda_is_refused(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
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
