"""The example scripts: each runs offline and computes what its stock PyTorch counterpart computes."""

from __future__ import annotations

import copy
import math
import urllib.error

import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
from _train_helpers import load_example

from torch_backprop.testing import assert_gradients_match


def test_drop_in_trains_exactly_like_the_stock_sequential(capsys):
    drop_in = load_example("drop_in")
    args = drop_in.main.__globals__["argparse"].Namespace(
        fake=True, data_root="", steps=4, batch_size=16, lr=0.05, native=False
    )
    manual_model, manual_losses = drop_in.train(args)
    args.native = True
    native_model, native_losses = drop_in.train(args)
    assert len(manual_losses) == 4
    torch.testing.assert_close(torch.tensor(manual_losses), torch.tensor(native_losses))
    for p, q in zip(manual_model.parameters(), native_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert drop_in.main(["--fake", "--steps", "2", "--batch-size", "8"]) == 0
    assert "step    1" in capsys.readouterr().out


def test_cnn_head_gradient_reaches_the_convolutions(capsys):
    example = load_example("cnn_head_cifar10")
    torch.manual_seed(0)
    model = example.ConvNetWithMLPHead(hidden=32)
    native = copy.deepcopy(model)
    native.head = model.head.to_sequential()  # the reference: autograd through every layer
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    errors = assert_gradients_match(model, native, x, rtol=1e-4, atol=1e-6)
    names = [e.name for e in errors]
    assert "features.0.weight" in names and "input[0]" in names
    assert example.main(["--fake", "--steps", "2", "--batch-size", "8"]) == 0
    assert "|∂W conv1|" in capsys.readouterr().out


def test_black_scholes_price_and_fit(capsys):
    example = load_example("black_scholes")
    # Hull's textbook value: S = K = 100, T = 1, r = 5%, σ = 20% gives C = 10.4506.
    price = example.call_price(*torch.tensor([[1.0, 1.0, 0.2, 0.05]], dtype=torch.float64).unbind(1))
    assert abs(100 * price.item() - 10.4506) < 1e-3
    result = example.fit(steps=100)
    assert result["test_mse"] < 0.25 * result["target_variance"]  # far better than predicting the mean
    assert example.main(["--steps", "3"]) == 0
    assert "test RMSE" in capsys.readouterr().out
    assert math.isfinite(result["centre_predicted"])


@pytest.mark.parametrize(
    "example, module, dataset",
    [
        ("drop_in", torchvision.datasets.mnist, "MNIST"),
        ("cnn_head_cifar10", torchvision.datasets.cifar, "CIFAR-10"),
    ],
)
def test_examples_without_fake_say_in_one_line_when_offline(
    example, module, dataset, tmp_path, monkeypatch, capsys
):
    def offline(*args, **kwargs):  # what torchvision's download meets without a network
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(module, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as exited:
        load_example(example).main(["--data-root", str(tmp_path), "--steps", "1"])
    message = str(exited.value.code)
    assert message.startswith(f"{example}.py: cannot load {dataset} into {tmp_path}")
    assert message.endswith("offline, run with --fake") and "\n" not in message
