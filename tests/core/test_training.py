"""Training trajectories: BackpropMLP and its native twin stay together step after step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_backprop import BackpropMLP


@pytest.mark.parametrize(
    "activation,dtype,rtol",
    [("relu", torch.float64, 1e-9), ("tanh", torch.float64, 1e-9), ("gelu", torch.float32, 1e-4)],
    ids=["relu-float64", "tanh-float64", "gelu-float32"],
)
def test_100_sgd_momentum_steps_match_native(activation, dtype, rtol):
    # Rounding differences compound over 100 steps, so the bound is looser than one step's.
    model = BackpropMLP([10, 32, 16, 4], activation, dropout=0.0, dtype=dtype)
    twin = model.to_sequential()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        x = torch.randn(32, 10, generator=generator, dtype=dtype)
        y = torch.randint(4, (32,), generator=generator)
        for module, optimizer in zip((model, twin), optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    # and the model did move: the comparison is not between two untouched initialisations
    assert not torch.allclose(
        model.layers[0].weight, BackpropMLP([10, 32, 16, 4], dtype=dtype).layers[0].weight
    )


def test_training_lowers_the_loss_with_adam_and_dropout():
    torch.manual_seed(0)
    model = BackpropMLP([2, 32, 32, 2], "relu", dropout=0.1)
    x = torch.randn(256, 2)
    y = (x[:, 0] * x[:, 1] > 0).long()  # XOR-like: not linearly separable
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.eval()
    start = F.cross_entropy(model(x), y).item()
    model.train()
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    end = F.cross_entropy(model(x), y).item()
    assert end < 0.5 * start
    assert (model(x).argmax(1) == y).float().mean() > 0.9
