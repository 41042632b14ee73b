"""examples/dp_mnist.py runs end to end: synthetic data always, the real MNIST files when present."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dp_mnist.py"


def load_example():
    spec = importlib.util.spec_from_file_location("dp_mnist", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_dp_sgd_learns(tmp_path: Path) -> None:
    example = load_example()
    out = tmp_path / "result.json"
    result = example.main(["--synthetic", "--epochs", "2", "--json", str(out)])
    assert out.exists()
    assert result["steps"] == 2 * round(1 / result["sample_rate"])
    assert result["noise_multiplier"] == 1.0 and result["max_grad_norm"] == 1.0
    assert result["test_accuracy"] > 0.5  # ten classes: chance is 0.1


def test_missing_data_root_is_a_clear_error(tmp_path: Path, capsys) -> None:
    example = load_example()
    absent = tmp_path / "absent"
    with pytest.raises(SystemExit) as caught:
        example.main(["--data-root", str(absent), "--epochs", "1"])
    assert caught.value.code == 2  # argparse's usage error, not a traceback
    message = capsys.readouterr().err
    assert str(absent) in message and "t10k-images-idx3-ubyte.gz" in message  # where, and what
    assert "leave out --data-root" in message and "--synthetic" in message  # how to proceed


def test_real_mnist_quick_run() -> None:
    example = load_example()  # the digits shipped with torch_backprop, no path given
    result = example.main(["--limit", "1000", "--epochs", "1", "--noise-multiplier", "0.5"])
    assert result["train_samples"] == 1000 and result["test_samples"] == 2000
    assert result["test_accuracy"] > 0.3
