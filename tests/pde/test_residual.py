"""residual_jacobian (RJ1-RJ5) against torch.func.jacrev of the residual vector on the native twin.

The reference is independent: the residual is computed from u, ∂u and D u of ``to_sequential()``
by torch.func (jacrev and hessian per point, tests/_pde_reference.py), and its Jacobian in the
parameters by ``torch.func.jacrev`` through all of that (nested autograd). float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from _pde_reference import coefficient_cases, reference_jacobian
from conftest import GRAD_TOLERANCE, OUTPUT_TOLERANCE, assert_close

from torch_backprop import BackpropMLP, available_activations, residual_jacobian

F64_OUT, F64 = OUTPUT_TOLERANCE[torch.float64], GRAD_TOLERANCE[torch.float64]
SECOND_ORDER = [a for a in available_activations() if a not in ("identity",)]


def nonlinear(x, d):
    """Reads every output and the points, nonlinearly: u₀ D u₁ − (∂_0 u₁)² + sin(u₀) + Σ x."""
    return d.operator[:, 1] * d.value[:, 0] - d.gradient[:, 1, 0].square() + d.value[:, 0].sin() + x.sum(-1)


def poisson(x, d):
    return -d.operator[:, 0] - math.pi**2 * torch.cos(math.pi * x).sum(-1)


def boundary(x, d):
    return d.value[:, 0] ** 3 - x[:, 0]


def assert_tape_matches(tape, r, J, seed=0):
    g = torch.Generator().manual_seed(seed)
    assert_close(tape.residual, r, F64_OUT, "r")
    assert_close(tape.jacobian(), J, F64, "J")
    tangents = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in tape.parameters]
    flat = torch.cat([t.flatten() for t in tangents])
    assert_close(tape.jvp(tangents), J @ flat, F64, "J v")
    u = torch.randn(J.shape[0], generator=g, dtype=J.dtype)
    assert_close(torch.cat([t.flatten() for t in tape.vjp(u)]), J.t() @ u, F64, "Jᵀ u")
    assert_close(tape.kernel(), J @ J.t(), F64, "J Jᵀ")
    assert_close(tape.gramian(), J.t() @ J, F64, "JᵀJ")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", SECOND_ORDER)
def test_interior_every_activation(activation, bias):
    model = BackpropMLP([3, 5, 4, 2], activation, output_activation="tanh", bias=bias, dtype=torch.float64)
    x = torch.rand(6, 3, dtype=torch.float64)
    kwargs, matrix = coefficient_cases(6, 3, torch.float64)["per-point-matrix+drift"]
    tape = residual_jacobian(model, x, nonlinear, **kwargs)
    r, J = reference_jacobian(model, x, nonlinear, 2, [0, 1, 2], matrix, kwargs["drift"])
    assert_tape_matches(tape, r, J)


@pytest.mark.parametrize("case", list(coefficient_cases(1, 1, torch.float64)))
def test_interior_every_kind_of_coefficients(case):
    model = BackpropMLP([3, 6, 5, 2], "tanh", dtype=torch.float64)
    x = torch.rand(5, 3, dtype=torch.float64)
    kwargs, matrix = coefficient_cases(5, 2, torch.float64, dim=3)[case]
    tape = residual_jacobian(model, x, nonlinear, coordinates=[2, 0], **kwargs)
    r, J = reference_jacobian(model, x, nonlinear, 2, [2, 0], matrix, kwargs.get("drift"))
    assert_tape_matches(tape, r, J)


def test_laplacian_poisson_residual():
    model = BackpropMLP([4, 8, 8, 1], "tanh", dtype=torch.float64)
    x = torch.rand(7, 4, dtype=torch.float64)
    r, J = reference_jacobian(model, x, poisson, 2, [0, 1, 2, 3], torch.eye(4, dtype=torch.float64))
    assert_tape_matches(residual_jacobian(model, x, poisson), r, J)


def test_heat_operator():
    # ∂_t u − ¼ Δ_x u on points (t, x): second derivatives in x alone, ∂_t as the first-order term.
    model = BackpropMLP([3, 7, 1], "gelu", dtype=torch.float64)
    x = torch.rand(6, 3, dtype=torch.float64)
    drift = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    diagonal = torch.full((2,), -0.25, dtype=torch.float64)

    def heat(x, d):
        return d.operator[:, 0]

    tape = residual_jacobian(model, x, heat, coordinates=[1, 2], diagonal=diagonal, drift=drift)
    r, J = reference_jacobian(model, x, heat, 2, [1, 2], torch.diag(diagonal), drift)
    assert_tape_matches(tape, r, J)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", available_activations())
def test_boundary_term(activation, bias):
    model = BackpropMLP([3, 5, 4, 1], activation, bias=bias, dtype=torch.float64)
    x = torch.rand(6, 3, dtype=torch.float64)
    r, J = reference_jacobian(model, x, boundary, 0)
    assert_tape_matches(residual_jacobian(model, x, boundary, order=0), r, J)


def test_frozen_parameters_are_not_columns():
    model = BackpropMLP([2, 5, 1], "tanh", dtype=torch.float64)
    model.layers[0].bias.requires_grad_(False)
    x = torch.rand(4, 2, dtype=torch.float64)
    tape = residual_jacobian(model, x, poisson)
    assert [id(p) for p in tape.parameters] == [id(p) for p in model.parameters() if p.requires_grad]
    r, J = reference_jacobian(model, x, poisson, 2, [0, 1], torch.eye(2, dtype=torch.float64))
    assert_tape_matches(tape, r, J)


def test_evaluate_follows_the_parameters_and_leaves_grad_alone():
    model = BackpropMLP([2, 5, 1], "tanh", dtype=torch.float64)
    x = torch.rand(4, 2, dtype=torch.float64)
    tape = residual_jacobian(model, x, poisson)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model.layers[1].weight.mul_(2)
    r, _ = reference_jacobian(model, x, poisson, 2, [0, 1], torch.eye(2, dtype=torch.float64))
    assert_close(tape.evaluate(), r, F64_OUT, "r after the change")
    assert not torch.equal(tape.evaluate(), tape.residual)


def test_loss_is_the_weighted_half_mean_square():
    model = BackpropMLP([2, 5, 1], "tanh", dtype=torch.float64)
    x = torch.rand(4, 2, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64)
    for weight, expected in ((3.0, 3.0), (w, w)):
        tape = residual_jacobian(model, x, poisson, weight=weight)
        assert_close(tape.loss(), 0.5 * (expected * tape.residual.square()).mean(), F64_OUT, "loss")


def test_a_residual_free_of_the_network_has_a_zero_jacobian():
    model = BackpropMLP([2, 5, 1], "tanh", dtype=torch.float64)
    tape = residual_jacobian(model, torch.rand(3, 2, dtype=torch.float64), lambda x, d: x[:, 0])
    assert torch.count_nonzero(tape.jacobian()) == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"order": 1}, ValueError, "order 0 .* or 2"),
        ({"order": 0, "coordinates": [0]}, ValueError, "order=0 takes no operator, got coordinates"),
        ({"weight": 0.0}, ValueError, "finite number > 0, got 0.0"),
        ({"weight": torch.ones(2, dtype=torch.float64)}, ValueError, r"shape \(4,\)"),
        ({"weight": -torch.ones(4, dtype=torch.float64)}, ValueError, "non-negative"),
        ({"coordinates": [5]}, ValueError, r"coordinates in \[0, 2\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = BackpropMLP([2, 5, 1], "tanh", dtype=torch.float64)
    with pytest.raises(error, match=match):
        residual_jacobian(model, torch.rand(4, 2, dtype=torch.float64), poisson, **kwargs)


def test_bad_models_points_and_residuals():
    model = BackpropMLP([2, 5, 1], "tanh", dtype=torch.float64)
    x = torch.rand(4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="residual_jacobian expects a torch_backprop.BackpropMLP, got Seq"):
        residual_jacobian(model.to_sequential(), x, poisson)
    with pytest.raises(ValueError, match=r"points of shape \(N, d\), got \(4, 2, 1\)"):
        residual_jacobian(model, x.unsqueeze(-1), poisson)
    with pytest.raises(TypeError, match="a function"):
        residual_jacobian(model, x, "poisson")
    with pytest.raises(ValueError, match=r"shape \(4,\), got \(4, 1\)"):
        residual_jacobian(model, x, lambda x, d: d.operator)
    with pytest.raises(TypeError, match="must return a tensor"):
        residual_jacobian(model, x, lambda x, d: 1.0)
