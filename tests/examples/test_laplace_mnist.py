"""examples/laplace_mnist.py runs end to end on tiny synthetic images (laplace-torch required)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("laplace")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "laplace_mnist.py"
TINY = ["--dataset", "fake", "--fake-size", "96", "--epochs", "1", "--hidden", "16", "--batch-size", "32"]


def load_example():
    spec = importlib.util.spec_from_file_location("laplace_mnist", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "options",
    [[], ["--subset", "all", "--structure", "diag"], ["--prior", "gridsearch", "--validation", "32"]],
    ids=["last-layer-kron", "all-diag", "gridsearch"],
)
def test_synthetic_run_reports_both_predictives_and_saves_the_diagram(tmp_path: Path, options) -> None:
    pytest.importorskip("matplotlib")
    plot, out = tmp_path / "reliability.png", tmp_path / "result.json"
    result = load_example().main([*TINY, *options, "--plot", str(plot), "--json", str(out)])
    assert plot.stat().st_size > 0 and json.loads(out.read_text()) == result
    assert result["test_samples"] == 24
    for name in ("map", "laplace_predictive"):
        assert (
            0 <= result[name]["accuracy"] <= 1 and result[name]["nll"] > 0 and 0 <= result[name]["ece"] <= 1
        )


def test_metrics_on_known_probabilities() -> None:
    import torch

    example = load_example()
    probabilities = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 1, 0])
    score = example.metrics(probabilities, labels)
    assert score["accuracy"] == 0.75
    assert score["nll"] == pytest.approx(-torch.tensor([0.9, 0.2, 0.7, 0.6]).log().mean().item())
    # bins of width 1/15: 0.9, 0.8, 0.7 and 0.6 fall in four bins; |accuracy - confidence| per bin
    assert score["ece"] == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4)


def test_mnist_10k_reads_the_shipped_digits_without_a_data_root(tmp_path: Path) -> None:
    example = load_example()
    result = example.main(
        ["--limit-train", "512", "--epochs", "3", "--hidden", "16", "--plot", str(tmp_path / "r.png")]
    )
    assert (result["dataset"], result["train_samples"], result["test_samples"]) == ("mnist-10k", 512, 2000)
    assert result["map"]["accuracy"] > 0.3  # 512 real digits, 12 steps: well above chance (0.1)


def test_an_absent_data_root_is_a_clear_error(tmp_path: Path, capsys) -> None:
    example = load_example()
    with pytest.raises(SystemExit):
        example.main(["--data-root", str(tmp_path / "absent"), "--epochs", "1"])
    assert "absent" in capsys.readouterr().err
