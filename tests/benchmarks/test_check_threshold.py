"""benchmarks/check_threshold.py: the project's targets read from a bench JSON: met, missed, not measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "check_threshold.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("check_threshold", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case(
    sizes, manual_native, manual_compiled=0.9, floor_manual=0.95, recompute_manual=1.2, fused_native=0.9
):
    """A bench case record with the fields the script reads; 4-byte inputs of batch 8."""
    input_bytes = 8 * sizes[0] * 4
    return {
        "name": f"{'-'.join(map(str, sizes))}@8 relu float32",
        "sizes": sizes,
        "ratios": {
            "manual/native": manual_native,
            "manual/compiled": manual_compiled,
            "floor/manual": floor_manual,
            "recompute/manual": recompute_manual,
            "fused/native": fused_native,
        },
        "input_bytes": input_bytes,
        "saved_bytes": {"manual": 100, "native": 100, "recompute": input_bytes},
        "saved_activation_bytes": {"manual": 80, "native": 80, "recompute": input_bytes},
    }


def run(script, tmp_path, report, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    status = script.main([str(path)])
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| ") and "target" not in line]
    return status, rows, captured.err


def test_all_targets_met(script, tmp_path, capsys):
    report = {"cases": [case([8, 16, 1], 0.9), case([1024, 1024, 1024, 1024], 0.94)]}
    status, rows, err = run(script, tmp_path, report, capsys)
    assert status == 0 and err == ""
    assert len(rows) == len(script.TARGETS) + 1  # plus floor/manual on the one [1024]*4 case
    assert all(row.endswith("| yes |") for row in rows)
    assert "| manual/native, median of the grid | 0.920 | 0.95 | yes |" in rows


def test_a_missed_target_fails_and_is_named(script, tmp_path, capsys):
    report = {"cases": [case([8, 16, 1], 1.2), case([1024, 1024, 1024, 1024], 0.94, floor_manual=0.9)]}
    status, rows, err = run(script, tmp_path, report, capsys)
    assert status == 1 and f"3 of {len(rows)} targets missed" in err
    missed = [row for row in rows if row.endswith("| **no** |")]
    assert missed == [
        "| manual/native, median of the grid | 1.070 | 0.95 | **no** |",
        "| manual/native, every case (max) | 1.200 | 1.00 | **no** |",
        "| floor/manual on 1024-1024-1024-1024@8 relu float32 | 0.900 | 0.93 | **no** |",
    ]


def test_unmeasured_targets_do_not_fail(script, tmp_path, capsys):
    report = {"cases": [case([8, 16, 1], 0.9, manual_compiled=None)]}  # e.g. --no-compile
    status, rows, _ = run(script, tmp_path, report, capsys)
    assert status == 0
    assert "| manual/compiled, median of the grid | – | 1.00 | not measured |" in rows
    assert not any("floor/manual" in row for row in rows)  # no [1024]*4 case in the grid


def test_fused_target_missed_and_not_measured(script, tmp_path, capsys):
    report = {
        "cases": [case([8, 16, 1], 0.9, fused_native=1.05), case([784, 256, 10], 0.9, fused_native=0.9)]
    }
    status, rows, _ = run(script, tmp_path, report, capsys)
    assert status == 1
    assert "| fused/native, every case (max) | 1.050 | 1.00 | **no** |" in rows
    del report["cases"][0]["ratios"]["fused/native"], report["cases"][1]["ratios"]["fused/native"]
    status, rows, _ = run(script, tmp_path, report, capsys)
    assert status == 0
    assert "| fused/native, median of the grid | – | 0.95 | not measured |" in rows
