"""examples/pinn_black_scholes.py: its PDE loss and its residual (all three ways) against the twin."""

from __future__ import annotations

import math

import pytest
import torch
from _train_helpers import load_example
from conftest import GRAD_TOLERANCE, assert_close
from torch import nn

F64 = GRAD_TOLERANCE[torch.float64]


@pytest.fixture(scope="module")
def example():
    return load_example("pinn_black_scholes")


class ClosedForm(nn.Module):
    """The exact price as a 'network', to check the loss and the derivative code independently."""

    def __init__(self, price, contract):
        super().__init__()
        self.price, self.contract = price, contract

    def forward(self, points):
        return self.price(points[:, 0], points[:, 1], self.contract)


def test_closed_form_price_and_the_exact_solutions_derivatives(example):
    c = example.Contract()
    # Hull's textbook value: S = K = 100, T = 1, r = 5%, σ = 20% gives C = 10.4506 (here K = 1).
    price = example.call_price(
        torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), c
    )
    assert abs(100 * price.item() - 10.4506) < 1e-3
    exact = ClosedForm(example.call_price, c)
    points = example.sample_points(c, 64, torch.Generator().manual_seed(0), torch.float64)
    # Away from the kink at t = T (where Γ blows up), the exact price has zero residual.
    interior = points.interior[(points.interior[:, 0] < 0.95) & (points.interior[:, 1] > 0.05)]
    for derivatives in example.DERIVATIVES.values():
        value, u_t, u_s, u_ss = derivatives(exact, interior)
        t, spot = interior.unbind(1)
        tau = c.maturity - t
        d1 = (torch.log(spot / c.strike) + (c.rate + 0.5 * c.volatility**2) * tau) / (
            c.volatility * tau.sqrt()
        )
        gamma = torch.exp(-0.5 * d1**2) / math.sqrt(2 * math.pi) / (spot * c.volatility * tau.sqrt())
        assert_close(u_s, torch.special.ndtr(d1), (1e-8, 1e-8), "delta")
        assert_close(u_ss, gamma, (1e-7, 1e-7), "gamma")
        residual = u_t + 0.5 * c.volatility**2 * spot**2 * u_ss + c.rate * spot * u_s - c.rate * value
        assert residual.abs().max() < 1e-8


@pytest.mark.parametrize("name", ["one forward pass", "double backward", "forward over reverse"])
def test_residual_and_loss_gradients_match_the_twin(example, name):
    c = example.Contract()
    ours, twin = example.make_pricers(c, [6, 5], "tanh", torch.float64, seed=1)
    points = example.sample_points(c, 32, torch.Generator().manual_seed(2), torch.float64)
    reference = example.RESIDUALS["double backward"]
    if name != "one forward pass":
        derivatives = example.DERIVATIVES[name]
        expected = example.derivatives_double_backward(twin, points.interior)
        for k, (a, b) in enumerate(zip(derivatives(ours, points.interior), expected, strict=True)):
            assert_close(a, b, F64, f"{name}: (u, u_t, u_S, u_SS)[{k}]")
    residual = example.RESIDUALS[name]
    assert_close(residual(ours, points.interior), reference(twin, points.interior), F64, "R")
    loss = example.pde_loss(ours, points, residual)
    ref_loss = example.pde_loss(twin, points, reference)
    assert_close(loss, ref_loss, F64, "loss")
    grads = torch.autograd.grad(loss, list(ours.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, list(twin.parameters()))
    for (param, _), g, r in zip(ours.named_parameters(), grads, ref_grads, strict=True):
        assert_close(g, r, F64, param)


def test_a_few_training_steps_match_the_twin_and_main_runs(example, capsys):
    c = example.Contract()
    ours, twin = example.make_pricers(c, [8, 8], "tanh", torch.float64, seed=0)
    kwargs = {"steps": 3, "points": 32, "lr": 1e-2, "seed": 0}
    losses = example.train(ours, residual=example.RESIDUALS["one forward pass"], **kwargs)
    ref = example.train(twin, residual=example.RESIDUALS["double backward"], **kwargs)
    assert_close(torch.tensor(losses), torch.tensor(ref), (1e-10, 1e-12), "losses")
    assert losses[-1] < losses[0]
    assert example.main(["--steps", "2", "--points", "16", "--hidden", "8", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "price error against Black-Scholes" in out and "forward over reverse" in out
    assert "R by one forward pass" in out
