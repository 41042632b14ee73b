"""The scripts in benchmarks/: their yardsticks compute native autograd's gradients, and they run.

Timings are never asserted; a run only has to finish and print its table.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torch_backprop import BackpropMLP

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gradients(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    F.cross_entropy(model(x), target).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("sizes", [[5, 3], [5, 7, 3], [5, 7, 6, 3]])
def test_function_overhead_yardsticks_give_native_gradients(sizes):
    overhead = load("function_overhead")
    torch.manual_seed(0)
    x, target = torch.randn(9, sizes[0], dtype=torch.float64), torch.randint(sizes[-1], (9,))
    flat = BackpropMLP(sizes, dtype=torch.float64)
    flat.backward_phase = overhead.flat_backward_phase
    bare_weights = BackpropMLP(sizes, dtype=torch.float64)
    bare_weights.load_state_dict(flat.state_dict())
    native = flat.to_sequential()
    expected = gradients(native, x, target)
    for model in (flat, overhead.BareMLP(bare_weights)):
        for got, want in zip(gradients(model, x, target), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def run_script(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_function_overhead_prints_one_row_per_case():
    out = run_script(
        "benchmarks/function_overhead.py",
        *("--cases", "6-8-3@4,6-1@4", "--threads", "1", "--rounds", "1", "--min-run-time", "0.01"),
    )
    rows = [line for line in out.splitlines() if line.startswith("| 6-")]
    assert [row.split(" | ")[0] for row in rows] == ["| 6-8-3@4", "| 6-1@4"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
        assert len(cells) == 4 and all(float(cell) > 0 for cell in cells)


def test_profile_step_prints_its_summary():
    out = run_script(
        "benchmarks/profile_step.py",
        *("--case", "6-8-3@4", "--threads", "1", "--steps", "2", "--rows", "3"),
    )
    summary = out[out.index("=== per step") :].splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in summary if line.startswith("| ")}
    assert {"manual", "native"} <= set(rows)
    for name in ("manual", "native"):
        cells = [float(cell) for cell in rows[name].strip("|").split("|")[1:]]
        assert len(cells) == 4 and cells[0] > 0


def test_per_sample_clipped_gradients_agree_with_a_float64_loop(tmp_path):
    out = tmp_path / "per_sample.json"
    result = load("per_sample").main(
        [
            *("--sizes", "6", "8", "3", "--batch-size", "5", "--rounds", "1", "--min-run-time", "0.01"),
            *("--threads", "1", "--json", str(out)),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    measured = {row["method"]: row for row in result["rows"] if "skipped" not in row}
    assert {"plain BackpropMLP", "per_sample clipped", "torch.func vmap(grad) + clipping"} <= set(measured)
    for name, row in measured.items():
        if name.startswith("plain"):
            assert row["max_abs_error_vs_float64_loop"] is None
        else:  # every clipping method against the float64 per-sample loop
            assert row["max_abs_error_vs_float64_loop"] < 1e-6, name
        assert len(row["times_s"]) == 1 and row["median_s"] > 0
    assert result["machine"]["threads"] == 1 and result["machine"]["cpu"]


def test_per_sample_whole_dp_step_rows_run_and_check_without_noise():
    result = load("per_sample").main(
        [
            *("--sizes", "6", "8", "3", "--batch-size", "5", "--rounds", "1", "--min-run-time", "0.01"),
            *("--threads", "1", "--whole-step", "--secure"),
        ]
    )
    measured = {row["method"]: row for row in result["rows"] if "skipped" not in row}
    styles = {"DP flat", "DP per_layer", "DP layer-wise", "DP param-wise", "DP group-wise", "DP automatic"}
    assert styles | {"DP adaptive", "plain BackpropMLP"} <= set(measured)
    assert {f"{name}, secure" for name in styles} <= set(measured)
    for name in ("DP flat", "Opacus hooks DP", "Opacus ghost DP"):
        if name in measured:  # σ = 0: the averaged clipped gradient of the float64 loop
            assert measured[name]["max_abs_error_vs_float64_loop"] < 1e-6, name
    assert {row["draw"] for row in result["noise_draws"]} >= {"one flat randn"}


@pytest.mark.skipif(importlib.util.find_spec("backpack") is None, reason="needs backpack-for-pytorch")
def test_curvature_benchmark_runs_and_agrees_with_backpack(tmp_path):
    out = tmp_path / "curvature.json"
    report = load("curvature").main(
        [
            *("--cases", "6-8-3@5,6-8-1@5", "--activations", "tanh", "--rounds", "1"),
            *("--min-run-time", "0.01", "--threads", "1", "--json", str(out)),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [row["loss"] for row in report["cases"]] == ["cross_entropy", "mse"]
    for row in report["cases"]:
        assert set(row["ratio_ours_backpack"]) == {"diag_ggn_exact", "diag_ggn_mc", "kfac"}, row["case"]
        for quantity in ("diag_ggn_exact", "kfac"):  # exact quantities; float32
            assert row["agreement"][quantity] < 1e-5, (row["case"], quantity)
        assert all(t > 0 for t in row["median_s"].values())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="needs opacus")
def test_opacus_fast_path_takes_the_twins_step(tmp_path):
    out = tmp_path / "opacus.json"
    run_script(
        "benchmarks/opacus_fast_path.py",
        *("--cases", "cnn", "--modes", "hooks,ghost", "--batch", "4", "--rounds", "1"),
        *("--min-run-time", "0.01", "--threads", "1", "--json", str(out)),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(row["case"], row["mode"]) for row in rows] == [("cnn", "hooks"), ("cnn", "ghost")]
    for row in rows:  # one noise-free Opacus step on the fused stack leaves the twin's parameters
        assert row["max_parameter_difference"] < 1e-6, row
        assert row["twin_ms"] > 0 and row["fused_ms"] > 0 and row["fused_peak_bytes"] > 0


def test_pinn_benchmark_runs_and_times_kfac(tmp_path):
    out = tmp_path / "pinn.json"
    argv = [
        *("--runs", "poisson2d:2", "--optimizers", "kfac", "--seeds", "0", "--log-every", "1"),
        *("--runs-dir", str(tmp_path / "runs"), "--timing", "poisson2d", "--contenders", "kfac", "gradient"),
        *("--rounds", "1", "--min-run-time", "0.01", "--threads", "1", "--timer", "cpu", "--json", str(out)),
        *("--memory", "poisson2d:8:4"),
    ]
    assert load("pinn").main(argv) == 0
    report = json.loads(out.read_text())
    run = report["runs"]["poisson2d/kfac"]
    assert [e["step"] for e in run["curve"]] == [0, 1, 2] and run["rms_error"]["median"] > 0
    (timing,) = report["timing"]
    assert set(timing["times"]) == {"kfac", "gradient"} and timing["kfac_over_gradient"] > 0
    assert "engd_over_floor" not in timing and timing["timer"] == "cpu"
    (memory,) = report["memory"]
    assert memory["interior"] == 8 and memory["peak_gib"] >= memory["before_step_gib"] > 0
