"""The benchmark's plumbing: counters against independent counts, report and files well formed.

No timing is asserted anywhere: the machines are shared and noisy.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch
from torch import nn

from torch_backprop import BackpropMLP, bench
from torch_backprop.cli import main

TINY = [((8, 16, 16, 1), 32), ((8, 16, 10), 16)]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# saved_bytes against counts made by hand


def test_saved_bytes_single_linear_saves_its_input() -> None:
    linear = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    # x needs no gradient, so addmm keeps only x (for ∂W), not the weight (that ∂x would need).
    assert bench.saved_bytes(lambda: linear(x)) == nbytes(x)
    assert bench.saved_bytes(lambda: linear(x), exclude=linear.parameters()) == nbytes(x)


def test_saved_bytes_counts_the_weight_when_the_input_needs_a_gradient() -> None:
    linear = nn.Linear(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    assert bench.saved_bytes(lambda: linear(x)) == nbytes(x) + nbytes(linear.weight)
    assert bench.saved_bytes(lambda: linear(x), exclude=linear.parameters()) == nbytes(x)


def test_saved_bytes_counts_a_shared_storage_once() -> None:
    # ReLU saves its output and the next Linear saves the same tensor as its input: one storage.
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    x = torch.randn(4, 5)
    hidden = 4 * 7 * 4  # (N, 7) float32
    expected = nbytes(x) + hidden + nbytes(model[2].weight)
    assert bench.saved_bytes(lambda: model(x)) == expected
    assert bench.saved_bytes(lambda: model(x), exclude=model.parameters()) == nbytes(x) + hidden


def test_saved_bytes_of_recompute_is_the_input() -> None:
    model = BackpropMLP([6, 9, 9, 3], recompute=True)
    x = torch.randn(5, 6)
    assert bench.saved_bytes(lambda: model(x), exclude=model.parameters()) == nbytes(x)


# ---------------------------------------------------------------------------------------------
# The report


@pytest.fixture(scope="module")
def report() -> dict:
    settings = bench.Settings(
        shapes=TINY, activations=["relu", "gelu"], rounds=2, min_run_time=1e-3, compile=False, threads=1
    )
    return bench.run_benchmark(settings)


def check_report(report: dict, cases: int, compiled: bool) -> None:
    assert set(report) == {"machine", "settings", "cases", "summary"}
    assert {"cpu", "threads", "torch", "device"} <= set(report["machine"])
    assert len(report["cases"]) == cases
    for case in report["cases"]:
        medians = case["median_s"]
        assert set(medians) == set(bench.CONTENDERS)
        for name, seconds in medians.items():
            if name == "compiled" and not compiled:
                assert seconds is None
                continue
            assert seconds > 0, (case["name"], name)
            rounds = case["rounds_s"][name]
            assert len(rounds) == report["settings"]["rounds"]
            assert medians[name] == pytest.approx(statistics.median(rounds))
        for key, (numerator, denominator) in bench.RATIOS.items():
            ratio = case["ratios"][key]
            if medians[numerator] is None or medians[denominator] is None:
                assert ratio is None
            else:
                assert ratio == pytest.approx(medians[numerator] / medians[denominator], rel=1e-12)
                paired = [
                    a / b
                    for a, b in zip(case["rounds_s"][numerator], case["rounds_s"][denominator], strict=True)
                ]
                assert case["paired_ratios"][key] == pytest.approx(statistics.median(paired), rel=1e-12)
        for counts in (case["saved_bytes"], case["saved_activation_bytes"]):
            assert set(counts) == {"manual", "native", "recompute"}
            assert all(isinstance(v, int) and v > 0 for v in counts.values())
        # Independent of the timing: recompute keeps exactly the input.
        assert case["saved_activation_bytes"]["recompute"] == case["input_bytes"]
        assert case["input_bytes"] == case["batch"] * case["sizes"][0] * 4
        assert case["loss"] == ("mse" if case["sizes"][-1] == 1 else "cross_entropy")
    for key, value in report["summary"]["median_ratios"].items():
        values = [c["ratios"][key] for c in report["cases"] if c["ratios"][key] is not None]
        assert value == (pytest.approx(statistics.median(values)) if values else None)
    for target in report["summary"]["targets"]:
        assert {"target", "value", "bound", "met"} == set(target)
        assert target["met"] in (True, False, None)


def check_table(table: str, report: dict) -> None:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(bench.TABLE_COLUMNS)
    rows = lines[2 : 2 + len(report["cases"])]
    for row, case in zip(rows, report["cases"], strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(header)
        assert cells[0] == case["name"]
        for column, cell in zip(header[1:], cells[1:], strict=True):
            if cell == "–":
                assert column in ("compiled ms", "manual/compiled")
                continue
            number = float(cell.split()[0])
            assert number > 0 and math.isfinite(number), (column, cell)
        shown = {
            key: float(cells[header.index(key)]) for key in bench.RATIOS if cells[header.index(key)] != "–"
        }
        for key, value in shown.items():
            assert value == pytest.approx(case["ratios"][key], abs=5e-4)
        assert cells[header.index("manual ms")] == f"{case['median_s']['manual'] * 1e3:.3g}"
    assert lines[2 + len(report["cases"])].startswith("| **median**")


def test_report_is_well_formed(report: dict) -> None:
    check_report(report, cases=len(TINY) * 2, compiled=False)
    json.dumps(report, allow_nan=False)


def test_table_is_well_formed(report: dict) -> None:
    check_table(bench.format_table(report), report)


def test_json_and_plot_are_written(report: dict, tmp_path) -> None:
    path = tmp_path / "out" / "report.json"
    bench.write_json(report, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    pytest.importorskip("matplotlib")
    image = tmp_path / "ratios.png"
    bench.plot_ratios(report, image)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["out", "ratios.png"]  # no temporary files left


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")

    def fail(temporary: str) -> None:
        with open(temporary, "w") as file:
            file.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        bench.write_atomic(path, fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_command_line(tmp_path, capsys) -> None:
    json_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    argv = [
        "bench",
        "--cases",
        "8-16-16-1@32",
        "--activations",
        "tanh",
        "--rounds",
        "1",
        "--min-run-time",
        "0.001",
        "--threads",
        "1",
        "--no-compile",
        "--timer",
        "cpu",
        "--json",
        str(json_path),
    ]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(plot_path)]
    except ImportError:
        pass
    assert main(argv) == 0
    report = json.loads(json_path.read_text())
    check_report(report, cases=1, compiled=False)
    check_table(capsys.readouterr().out, report)
    assert report["cases"][0]["name"] == "8-16-16-1@32 tanh float32"
    assert report["settings"]["timer"] == "cpu"


@pytest.mark.slow
def test_compiled_contender(tmp_path) -> None:
    settings = bench.Settings(
        shapes=[((8, 16, 1), 16)], activations=["relu"], rounds=1, min_run_time=1e-3, compile=True, threads=1
    )
    report = bench.run_benchmark(settings)
    case = report["cases"][0]
    if case["compile_error"] is not None:
        pytest.skip(f"torch.compile unavailable here: {case['compile_error']}")
    check_report(report, cases=1, compiled=True)
    check_table(bench.format_table(report), report)
    assert case["compile_s"] > 0


@pytest.mark.parametrize("text", ["784-256-10", "784@64", "784-x-10@64", "784-256-10@0", ""])
def test_parse_cases_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="784-256-10@64"):
        bench.parse_cases(text)


def test_parse_cases() -> None:
    assert bench.parse_cases("784-256-10@64, 8-16-16-1@32") == [((784, 256, 10), 64), ((8, 16, 16, 1), 32)]
