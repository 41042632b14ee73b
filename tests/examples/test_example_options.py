"""Every example answers a bad option or output path in one line, exit 2, before any data or model.

And none writes into the folder it runs in (the repository, run as the docs show) unless told where.
"""

from __future__ import annotations

import pytest
from _train_helpers import load_example

from torch_backprop import BackpropMLP


def _no_work(*args, **kwargs):
    raise AssertionError("data was loaded or a model built before every option was checked")


# (example, options, message); {tmp} is the test's folder, which holds the file notes.txt
CASES = [
    ("drop_in", ["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    ("cnn_head_cifar10", ["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    ("black_scholes", ["--batch-size", "-1"], "argument --batch-size: expected an integer >= 1, got '-1'"),
    (
        "dp_mnist",
        ["--hidden", "256,0"],
        "argument --hidden: expected positive widths (0 is not), got '256,0'",
    ),
    ("dp_mnist", ["--activation", "nope"], "argument --activation: invalid choice: 'nope'"),
    ("dp_mnist", ["--delta", "1"], "argument --delta: expected a finite number > 0 and < 1, got '1'"),
    (
        "dp_mnist",
        ["--json", "{tmp}/absent/r.json"],
        "argument --json: expected a file in an existing folder, got '{tmp}/absent/r.json' "
        "(no folder {tmp}/absent)",
    ),
    (
        "dp_mnist",
        ["--data-root", "{tmp}/absent"],
        "argument --data-root: expected a folder holding t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz, got {tmp}/absent (no such folder)",
    ),
    (
        "laplace_mnist",
        ["--plot", "{tmp}/notes.txt/r.png"],
        "argument --plot: expected a file in an existing folder, got '{tmp}/notes.txt/r.png' "
        "({tmp}/notes.txt is a file)",
    ),
    (
        "laplace_mnist",
        ["--prior", "gridsearch", "--validation", "8000"],
        "argument --validation: expected fewer than the 8000 training digits, got 8000",
    ),
    ("laplace_mnist", ["--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    ("pinn_black_scholes", ["--points", "0"], "argument --points: expected an integer >= 1, got '0'"),
    (
        "pinn_black_scholes",
        ["--hidden", "48", "x"],
        "argument --hidden: expected widths as comma-separated integers such as 48,48,48, got '48 x'",
    ),
    ("poisson", ["--dim", "0"], "argument --dim: expected an integer >= 1, got '0'"),
    (
        "poisson",
        ["--solution", "products", "--dim", "3"],
        "--solution products pairs the coordinates: expected an even --dim, got 3",
    ),
]


@pytest.mark.parametrize("name, options, message", CASES, ids=[f"{c[0]}{c[1][0]}" for c in CASES])
def test_a_bad_option_is_one_line_exit_2_before_any_work(
    name, options, message, tmp_path, monkeypatch, capsys
):
    (tmp_path / "notes.txt").write_text("keep me")
    argv = [option.format(tmp=tmp_path) for option in options]
    example = load_example(name)
    monkeypatch.setattr(BackpropMLP, "__init__", _no_work)
    for loader in ("load_dataset", "load_mnist", "make_loader", "synthetic_digits"):
        if hasattr(example, loader):
            monkeypatch.setattr(example, loader, _no_work)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        example.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    prog = f"python examples/{name}.py"
    assert err.startswith(f"{prog}: {message.format(tmp=tmp_path)}"), err
    assert err.endswith(f" (see {prog} --help)\n") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written, no folder made


def test_laplace_mnist_writes_nothing_unless_told_where(tmp_path, monkeypatch):
    pytest.importorskip("laplace")
    monkeypatch.chdir(tmp_path)
    tiny = ["--dataset", "fake", "--fake-size", "64", "--epochs", "1", "--hidden", "8", "--batch-size", "32"]
    result = load_example("laplace_mnist").main(tiny)
    assert "plot" not in result and list(tmp_path.iterdir()) == []
