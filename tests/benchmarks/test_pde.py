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
    ref = torch.utils._pytree.tree_leaves(steps["native"]())
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_close(a, b, F32, f"H v [{k}]")


@pytest.mark.parametrize("how", ["double backward", "forward over reverse"])
def test_pde_step_contenders_give_the_same_gradients(pde, how):
    pinn = pde.load_pinn()
    steps = pde.pde_steps(pinn, [6], 8, how, compile=False)
    grads = []
    for name in ("manual", "native"):
        steps[name]()
        grads.append([p.grad.clone() for p in steps[name].module.parameters()])
    for k, (a, b) in enumerate(zip(*grads, strict=True)):
        assert_close(a, b, F32, f"parameter gradient [{k}]")


def test_script_prints_every_workload(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/pde.py",
            *("--hidden", "6", "--points", "8", "--hvp-sizes", "5-6-3", "--hvp-batch", "4"),
            *(
                "--rounds",
                "1",
                "--min-run-time",
                "0.01",
                "--no-compile",
                "--json",
                str(tmp_path / "pde.json"),
            ),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's package, not an installed one
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = [
        "pde double backward",
        "pde forward over reverse",
        "hvp reverse over reverse",
        "hvp forward over reverse",
    ]
    for name in names:
        line = next(line for line in result.stdout.splitlines() if line.startswith(name))
        assert float(line.split()[-2]) > 0  # manual / native
    assert "failed" not in result.stdout
    assert (tmp_path / "pde.json").exists()
