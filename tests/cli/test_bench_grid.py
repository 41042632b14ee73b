"""The step-time benchmark's measuring: saved-byte counts against hand counts, a report that adds up.

No timing is asserted anywhere: the machines are shared and noisy.
"""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_checks import check_report, check_table
from torch import nn

from torch_backprop import BackpropMLP
from torch_backprop.cli import bench
from torch_backprop.cli.bench_report import format_table

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


def test_report_is_well_formed(report: dict) -> None:
    check_report(report, cases=len(TINY) * 2, compiled=False)
    json.dumps(report, allow_nan=False)


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
    check_table(format_table(report), report)
    assert case["compile_s"] > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("784-256-10", "expected cases WIDTHS@BATCH such as 784,256,10@64, got '784-256-10'"),
        (
            "784@64",
            "expected each case's widths as two or more positive integers, such as 784,256,10@64, "
            "got '784@64'",
        ),
        ("784-x-10@64", "expected each case's widths as two or more positive integers"),
        ("784,0,10@64", "expected each case's widths as two or more positive integers"),
        ("784-256-10@0", "expected a positive batch after @, such as 784,256,10@64, got '784-256-10@0'"),
        ("784,256@x", "expected a positive batch after @"),
        ("", "expected cases WIDTHS@BATCH such as 784,256,10@64, got ''"),
    ],
)
def test_parse_cases_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        bench.parse_cases(text)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    "text",
    [
        "784,256,10@64 8,16,16,1@32",
        "784-256-10@64,8-16-16-1@32",
        "784-256-10@64, 8-16-16-1@32",
        "784,256,10@64,8,16,16,1@32",
    ],
    ids=["commas-spaces", "dashes-commas", "dashes-comma-space", "commas-only"],
)
def test_parse_cases_reads_each_way_of_writing_widths(text: str) -> None:
    assert bench.parse_cases(text) == [((784, 256, 10), 64), ((8, 16, 16, 1), 32)]


def test_matmul_floor_runs_the_products_of_one_step(monkeypatch) -> None:
    # Per layer the forward product and BP3, and BP2 above the first layer: 3 + 3 + 2 for three layers.
    shapes = []
    real_mm = torch.Tensor.mm

    def counting_mm(a, b):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b)

    step = bench.matmul_floor([5, 7, 6, 3], batch=4, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(torch.Tensor, "mm", counting_mm)
    step()
    assert shapes == [
        ((4, 5), (5, 7)), ((7, 4), (4, 5)),
        ((4, 7), (7, 6)), ((6, 4), (4, 7)), ((4, 6), (6, 7)),
        ((4, 6), (6, 3)), ((3, 4), (4, 6)), ((4, 3), (3, 6)),
    ]  # fmt: skip
