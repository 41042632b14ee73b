"""Checks shared by the benchmark and bench-command tests: a report and its table are well formed."""

from __future__ import annotations

import math
import statistics

import pytest

from torch_backprop.cli import bench


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
    assert set(report["summary"]) == {"median_ratios"}  # times and ratios only: no targets


def check_table(table: str, report: dict) -> None:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    times = [f"{name} ms" for name in bench.CONTENDERS]
    assert header == ["case", *times, *bench.RATIOS, "saved manual", "saved native", "saved recompute"]
    rows = lines[2 : 2 + len(report["cases"])]
    for row, case in zip(rows, report["cases"], strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(header)
        assert cells[0] == case["name"]
        for column, cell in zip(header[1:], cells[1:], strict=True):
            if cell == "–":
                assert column in ("compiled ms", "manual/compiled", "fused/compiled")
                continue
            number = float(cell.split()[0])
            assert math.isfinite(number), (column, cell)
            # a tiny case's floor/manual may print as 0.000; times and bytes are positive
            assert number >= 0 if column in bench.RATIOS else number > 0, (column, cell)
        shown = {
            key: float(cells[header.index(key)]) for key in bench.RATIOS if cells[header.index(key)] != "–"
        }
        for key, value in shown.items():
            assert value == pytest.approx(case["ratios"][key], abs=5e-4)
        assert cells[header.index("manual ms")] == f"{case['median_s']['manual'] * 1e3:.3g}"
    assert lines[2 + len(report["cases"])].startswith("| **median**")
    assert len(lines) == 3 + len(report["cases"])  # nothing after the medians: no targets
