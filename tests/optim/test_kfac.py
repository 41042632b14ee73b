"""KFAC for PDE losses (KF1-KF3) against a brute-force reference.

The references never use the package's Taylor pass, tape or solves: the Kronecker factors come from
tests/_kfac_reference.py (the twin's rows by a plain Taylor forward, checked against jacrev and
hessian; the adjoints by ``torch.func.jacrev`` in per-row perturbations; the factors by their
definition, in loops), the gradient and the Gauss–Newton matrix from tests/_pde_reference.py
(``jacrev`` of the residual vector on ``to_sequential()``), the step from explicit ``torch.kron``
matrices and ``torch.linalg.solve``, the 2×2 rule from the dense quadratic model.
"""

from __future__ import annotations

import math

import pytest
import torch
from _kfac_reference import reference_factors
from _pde_reference import coefficient_cases, reference_jacobian
from conftest import GRAD_TOLERANCE, assert_close

from torch_backprop import BackpropMLP, available_activations, residual_jacobian

F64, F32 = GRAD_TOLERANCE[torch.float64], GRAD_TOLERANCE[torch.float32]
EYE2 = torch.eye(2, dtype=torch.float64)
SECOND_ORDER = [a for a in available_activations() if a != "identity"]


def nonlinear(x, d):
    """Reads every output and the points, nonlinearly: u₀ D u₁ − (∂_0 u₁)² + sin(u₀) + Σ x."""
    return d.operator[:, 1] * d.value[:, 0] - d.gradient[:, 1, 0].square() + d.value[:, 0].sin() + x.sum(-1)


def cubic(x, d):
    return d.value[:, 0] ** 3 - x[:, 0]


def interior(x, d):  # −Δu = f for u* = Π sin(π x_i)
    return -d.operator[:, 0] - 2 * math.pi**2 * torch.sin(math.pi * x).prod(-1)


def boundary(x, d):
    return d.value[:, 0] - torch.sin(math.pi * x).prod(-1)


def assert_factors_match(actual, expected, tolerance=F64):
    assert len(actual) == len(expected)
    for k, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if want is None:
            assert got is None, f"layer {k} has nothing trainable but got factors"
            continue
        assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
        assert_close(got[0], want[0], tolerance, f"A of layer {k}")
        assert_close(got[1], want[1], tolerance, f"B of layer {k}")


def _wb_order(offset, out, inp):
    """Indices of the flat [W (out × in), b (out)] block in the [W, b] (out × (in + 1)) row-major order."""
    weight = torch.arange(out * inp).view(out, inp) + offset
    bias = torch.arange(out).view(out, 1) + offset + out * inp
    return torch.cat([weight, bias], 1).flatten()


# ---------------------------------------------------------------------------------------------
# KF1-KF3: the tape's factors against the brute-force reference.


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", SECOND_ORDER)
def test_interior_factors_every_activation(activation, bias):
    model = BackpropMLP([3, 5, 4, 2], activation, output_activation="tanh", bias=bias, dtype=torch.float64)
    x = torch.rand(5, 3, dtype=torch.float64)
    weight = torch.rand(5, dtype=torch.float64)
    kwargs, matrix = coefficient_cases(5, 3, torch.float64)["per-point-matrix+drift"]
    tape = residual_jacobian(model, x, nonlinear, weight=weight, **kwargs)
    expected, _ = reference_factors(model, x, nonlinear, 2, [0, 1, 2], matrix, kwargs["drift"], weight)
    assert_factors_match(tape.kronecker_factors(), expected)


@pytest.mark.parametrize("case", list(coefficient_cases(1, 1, torch.float64)))
def test_interior_factors_every_kind_of_coefficients(case):
    model = BackpropMLP([3, 6, 5, 2], "tanh", dtype=torch.float64)
    x = torch.rand(4, 3, dtype=torch.float64)
    kwargs, matrix = coefficient_cases(4, 2, torch.float64, dim=3)[case]
    tape = residual_jacobian(model, x, nonlinear, coordinates=[2, 0], **kwargs)
    expected, _ = reference_factors(model, x, nonlinear, 2, [2, 0], matrix, kwargs.get("drift"))
    assert_factors_match(tape.kronecker_factors(), expected)


def test_laplacian_and_heat_factors():
    model = BackpropMLP([3, 7, 6, 1], "tanh", dtype=torch.float64)
    x = torch.rand(6, 3, dtype=torch.float64)
    tape = residual_jacobian(model, x, interior, weight=3.0)
    expected, _ = reference_factors(
        model, x, interior, 2, [0, 1, 2], torch.eye(3, dtype=torch.float64), None, 3.0
    )
    assert_factors_match(tape.kronecker_factors(), expected)
    # ∂_t u − ¼ Δ_x u on points (t, x): second derivatives in x alone, ∂_t as the first-order term
    drift = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    diagonal = torch.full((2,), -0.25, dtype=torch.float64)

    def heat(x, d):
        return d.operator[:, 0]

    tape = residual_jacobian(model, x, heat, coordinates=[1, 2], diagonal=diagonal, drift=drift)
    expected, _ = reference_factors(model, x, heat, 2, [1, 2], torch.diag(diagonal), drift)
    assert_factors_match(tape.kronecker_factors(), expected)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", available_activations())
def test_boundary_factors_are_ordinary_kfac(activation, bias):
    model = BackpropMLP([3, 5, 4, 1], activation, bias=bias, dtype=torch.float64)
    x = torch.rand(6, 3, dtype=torch.float64)
    weight = torch.rand(6, dtype=torch.float64)
    tape = residual_jacobian(model, x, cubic, order=0, weight=weight)
    expected, _ = reference_factors(model, x, cubic, 0, weight=weight)
    assert_factors_match(tape.kronecker_factors(), expected)


def test_frozen_parameters_leave_their_columns_out():
    model = BackpropMLP([2, 5, 4, 1], "tanh", dtype=torch.float64)
    model.layers[0].weight.requires_grad_(False)  # layer 0: the bias alone, A is 1 × 1
    model.layers[1].bias.requires_grad_(False)  # layer 1: the weight alone
    model.layers[2].requires_grad_(False)  # layer 2: nothing
    x = torch.rand(5, 2, dtype=torch.float64)
    tape = residual_jacobian(model, x, interior)
    expected, _ = reference_factors(model, x, interior, 2, [0, 1], EYE2)
    factors = tape.kronecker_factors()
    assert factors[0][0].shape == (1, 1) and factors[1][0].shape == (5, 5) and factors[2] is None
    assert_factors_match(factors, expected)


def test_one_boundary_point_gives_the_gauss_newton_block_exactly():
    # N = S = 1: B ⊗ A is the layer's block of J̃ᵀJ̃ over [W, b] row by row, no approximation.
    model = BackpropMLP([3, 4, 2, 1], "tanh", dtype=torch.float64)
    x = torch.rand(1, 3, dtype=torch.float64)
    _, J = reference_jacobian(model, x, cubic, 0)
    gramian = J.t() @ J
    tape = residual_jacobian(model, x, cubic, order=0)
    offset = 0
    for k, (A, B) in enumerate(tape.kronecker_factors()):
        layer = model.layers[k]
        out, inp = layer.weight.shape
        index = _wb_order(offset, out, inp)
        assert_close(torch.kron(B, A), gramian[index][:, index], F64, f"B ⊗ A of layer {k}")
        offset += out * inp + out


def test_float32_factors_are_float64_and_an_empty_term_gives_zeros():
    model = BackpropMLP([2, 6, 1], "tanh", dtype=torch.float32)
    x = torch.rand(5, 2, dtype=torch.float32)
    expected, _ = reference_factors(model, x, interior, 2, [0, 1], EYE2)
    assert_factors_match(residual_jacobian(model, x, interior).kronecker_factors(), expected, F32)
    empty = residual_jacobian(model, x[:0], boundary, order=0).kronecker_factors()
    assert all(torch.count_nonzero(A) == 0 and torch.count_nonzero(B) == 0 for A, B in empty)
