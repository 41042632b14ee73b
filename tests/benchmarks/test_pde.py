"""benchmarks/pde.py: its contenders compute the same numbers, and the script runs and prints its table."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close

ROOT = Path(__file__).resolve().parents[2]
F32 = (1e-4, 1e-5)  # float32, second derivatives through a few layers


@pytest.fixture(scope="module")
def pde():
    spec = importlib.util.spec_from_file_location("benchmark_pde", ROOT / "benchmarks" / "pde.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("how", ["reverse over reverse", "forward over reverse"])
def test_hvp_contenders_agree(pde, how):
    steps = pde.hvp_steps([5, 6, 3], 4, how, compile=False)
    ours = torch.utils._pytree.tree_leaves(steps["manual"]())
    ref = torch.utils._pytree.tree_leaves(steps[how]())
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_close(a, b, F32, f"H v [{k}]")


def _gradients(step):
    step()
    return [p.grad.clone() for p in step.module.parameters()]


def test_black_scholes_contenders_give_the_same_gradients(pde):
    steps = pde.black_scholes_steps(pde.load_pinn(), [6], 8, compile=False)
    reference = _gradients(steps["double backward"])
    for name in ("manual", "forward over reverse"):
        for k, (a, b) in enumerate(zip(_gradients(steps[name]), reference, strict=True)):
            assert_close(a, b, F32, f"{name}: parameter gradient [{k}]")


@pytest.mark.parametrize("train", [False, True], ids=["laplacian", "poisson-step"])
def test_laplacian_contenders_agree(pde, train):
    steps = pde.laplacian_steps(pde.load_example("poisson"), 3, 7, 5, train, compile=False)
    if train:
        reference = _gradients(steps["double backward"])
        for name in ("manual", "forward over reverse"):
            for k, (a, b) in enumerate(zip(_gradients(steps[name]), reference, strict=True)):
                assert_close(a, b, F32, f"{name}: parameter gradient [{k}]")
    else:
        reference = steps["double backward"]()
        for name in ("manual", "forward over reverse"):
            for a, b, what in zip(steps[name](), reference, ("u", "Δu"), strict=True):
                assert_close(a, b, F32, f"{name}: {what}")


def test_ratios_take_the_faster_native_method():
    spec = importlib.util.spec_from_file_location("benchmark_pde_ratios", ROOT / "benchmarks" / "pde.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    medians = {"manual": 2.0, "double backward": 4.0, "forward over reverse": 5.0, "compiled": 1.0}
    r = module.ratios(medians)
    assert r["manual / native"] == 0.5 and r["manual / compiled"] == 2.0
    assert r["manual compiled / compiled"] is None


def test_script_prints_every_workload(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/pde.py",
            *("--hidden", "6", "--points", "8", "--dims", "2", "--widths", "5", "--laplacian-points", "4"),
            *("--hvp-sizes", "5-6-3", "--hvp-batch", "4"),
            *("--rounds", "1", "--min-run-time", "0.01", "--no-compile"),
            *("--json", str(tmp_path / "pde.json")),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's package, not an installed one
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = [
        "black-scholes step",
        "laplacian d=2 w=5",
        "poisson step d=2 w=5",
        "hvp reverse over reverse",
        "hvp forward over reverse",
    ]
    for name in names:
        line = next(line for line in result.stdout.splitlines() if line.startswith(name))
        assert float(line.split()[-3]) > 0  # manual / native
    assert "failed" not in result.stdout
    assert (tmp_path / "pde.json").exists()
