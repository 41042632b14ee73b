"""KFAC for PDE losses (KF1-KF10) against a brute-force reference and a dense solve.

The references never use the package's Taylor pass, tape or solves: the Kronecker factors come from
tests/_kfac_reference.py (the twin's rows by a plain Taylor forward, checked against jacrev and
hessian; the adjoints by ``torch.func.jacrev`` in per-row perturbations; the factors by their
definition, in loops), the gradient and the Gauss–Newton matrix from tests/_pde_reference.py
(``jacrev`` of the residual vector on ``to_sequential()``), the step from explicit ``torch.kron``
matrices and ``torch.linalg.solve``, the 2×2 rule from the dense quadratic model.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from _kfac_reference import reference_factors
from _least_squares_problem import EYE2, boundary, closure_of, flat, interior
from _least_squares_problem import problem as _problem
from _pde_reference import coefficient_cases, reference_jacobian
from conftest import GRAD_TOLERANCE, assert_close

from torch_backprop import KFAC, BackpropMLP, available_activations, residual_jacobian


def problem(n_interior, n_boundary, hidden=5, **kwargs):
    return _problem(n_interior, n_boundary, hidden, **kwargs)


F64, F32 = GRAD_TOLERANCE[torch.float64], GRAD_TOLERANCE[torch.float32]
SECOND_ORDER = [a for a in available_activations() if a != "identity"]


def nonlinear(x, d):
    """Reads every output and the points, nonlinearly: u₀ D u₁ − (∂_0 u₁)² + sin(u₀) + Σ x."""
    return d.operator[:, 1] * d.value[:, 0] - d.gradient[:, 1, 0].square() + d.value[:, 0].sin() + x.sum(-1)


def cubic(x, d):
    return d.value[:, 0] ** 3 - x[:, 0]


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


# ---------------------------------------------------------------------------------------------
# The optimiser against a dense reference built from the reference factors.


def dense_system(model, x_in, x_bd, weights=(1.0, 1.0)):
    """(J̃, r̃) by torch.func in float64: rows scaled by √(w / N) (LS1)."""
    model64 = copy.deepcopy(model).double()
    r_in, J_in = reference_jacobian(model64, x_in.double(), interior, 2, [0, 1], EYE2)
    r_bd, J_bd = reference_jacobian(model64, x_bd.double(), boundary, 0)
    s_in, s_bd = math.sqrt(weights[0] / len(x_in)), math.sqrt(weights[1] / len(x_bd))
    return torch.cat([s_in * J_in, s_bd * J_bd]), torch.cat([s_in * r_in, s_bd * r_bd])


def reference_pairs(model, x_in, x_bd, weights=(1.0, 1.0)):
    interior_factors, _ = reference_factors(model, x_in, interior, 2, [0, 1], EYE2, None, weights[0])
    boundary_factors, _ = reference_factors(model, x_bd, boundary, 0, weight=weights[1])
    return interior_factors, boundary_factors


def averaged(history, beta, identity=True):
    """KF4 over a list of per-layer factor lists, from I (or 0)."""
    out = []
    for k, (A, B) in enumerate(history[0]):
        A_avg = torch.eye(len(A), dtype=torch.float64) if identity else torch.zeros_like(A)
        B_avg = torch.eye(len(B), dtype=torch.float64) if identity else torch.zeros_like(B)
        for factors in history:
            A_avg = beta * A_avg + (1 - beta) * factors[k][0]
            B_avg = beta * B_avg + (1 - beta) * factors[k][1]
        out.append((A_avg, B_avg))
    return out


def dense_kfac_step(model, gradient, interior_avg, boundary_avg, damping):
    """Δ = −C⁻¹ ∇L with C = Σ_κ kron(B_κ + λI, A_κ + λI) per layer (KF5, KF8), by torch.linalg.solve."""
    step, offset = torch.zeros_like(gradient), 0
    for k, layer in enumerate(model.layers):
        out, inp = layer.weight.shape
        index = _wb_order(offset, out, inp)
        C = sum(
            torch.kron(
                B + damping * torch.eye(out, dtype=torch.float64),
                A + damping * torch.eye(inp + 1, dtype=torch.float64),
            )
            for A, B in (interior_avg[k], boundary_avg[k])
        )
        step[index] = -torch.linalg.solve(C, gradient[index])
        offset += out * inp + out
    return step


def assert_step_close(actual, expected, name, tolerance=1e-9):
    error = float((actual - expected).norm())
    bound = tolerance * float(expected.norm()) + 1e-14
    assert error <= bound, f"{name}: |δ| = {error:.2e} > {bound:.2e}"


@pytest.mark.parametrize(
    "beta, identity", [(0.0, True), (0.8, True), (0.8, False)], ids=["no-ema", "ema-from-I", "ema-from-0"]
)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)], ids=["w1", "w2-0.5"])
def test_one_step_equals_the_dense_kronecker_solve(beta, identity, weights):
    model, x_in, x_bd = problem(12, 6)
    damping, theta0 = 1e-3, flat(model)
    J, r = dense_system(model, x_in, x_bd, weights)
    interior_f, boundary_f = reference_pairs(model, x_in, x_bd, weights)
    step = dense_kfac_step(
        model,
        J.t() @ r,
        averaged([interior_f], beta, identity),
        averaged([boundary_f], beta, identity),
        damping,
    )
    optimizer = KFAC(
        model.parameters(),
        lr=0.5,
        damping=damping,
        ema_factor=beta,
        initialize_to_identity=identity,
        line_search_fn=None,
    )
    loss = optimizer.step(closure_of(model, x_in, x_bd, weights))
    assert_close(loss, 0.5 * r.square().sum(), F64, "loss before the step")
    assert_step_close(flat(model) - theta0, 0.5 * step, "θ1 − θ0")
    state = optimizer.state["kfac"]
    for kind, factors in (
        ("interior", averaged([interior_f], beta, identity)),
        ("boundary", averaged([boundary_f], beta, identity)),
    ):
        assert_factors_match(state["factors"][kind], factors)
    assert state["step"] == 1 and state["lr"] == 0.5 and all(p.grad is None for p in model.parameters())


def test_ema_and_momentum_over_two_steps_with_new_points():
    model, x_in, x_bd = problem(12, 6)
    _, x_in2, x_bd2 = problem(10, 5, seed=3)
    probe = copy.deepcopy(model)
    beta, damping = 0.7, 1e-3
    optimizer = KFAC(
        model.parameters(), lr=0.3, momentum=0.6, damping=damping, ema_factor=beta, line_search_fn=None
    )
    optimizer.step(closure_of(model, x_in, x_bd))
    theta1 = flat(model)
    optimizer.step(closure_of(model, x_in2, x_bd2))
    # reference: the factors at θ0 on the first points, at θ1 on the second, averaged (KF4)
    first = reference_pairs(probe, x_in, x_bd)
    J0, r0 = dense_system(probe, x_in, x_bd)
    u1 = 0.3 * dense_kfac_step(
        probe, J0.t() @ r0, averaged([first[0]], beta), averaged([first[1]], beta), damping
    )
    torch.nn.utils.vector_to_parameters(theta1, probe.parameters())
    second = reference_pairs(probe, x_in2, x_bd2)
    interior_avg, boundary_avg = averaged([first[0], second[0]], beta), averaged([first[1], second[1]], beta)
    J1, r1 = dense_system(probe, x_in2, x_bd2)
    u2 = 0.3 * dense_kfac_step(probe, J1.t() @ r1, interior_avg, boundary_avg, damping) + 0.6 * u1
    assert_step_close(flat(model) - theta1, u2, "θ2 − θ1")
    state = optimizer.state["kfac"]
    assert_factors_match(state["factors"]["interior"], interior_avg)
    assert_factors_match(state["factors"]["boundary"], boundary_avg)


def test_several_terms_of_a_kind_are_pooled():
    # Two interior halves of weight ½ each are the loss of one term over all points, and KF4's
    # pooling gives that term's factors.
    model, x_in, x_bd = problem(12, 6)
    twin = copy.deepcopy(model)
    one = KFAC(model.parameters(), damping=1e-3, line_search_fn=None, ema_factor=0.0)
    two = KFAC(twin.parameters(), damping=1e-3, line_search_fn=None, ema_factor=0.0)
    loss_one = one.step(closure_of(model, x_in, x_bd))
    loss_two = two.step(
        lambda: [
            residual_jacobian(twin, x_in[:6], interior, weight=0.5),
            residual_jacobian(twin, x_in[6:], interior, weight=0.5),
            residual_jacobian(twin, x_bd, boundary, order=0),
        ]
    )
    assert_close(loss_two, loss_one, F64, "loss")
    for kind in ("interior", "boundary"):
        assert_factors_match(two.state["kfac"]["factors"][kind], one.state["kfac"]["factors"][kind])
    assert_step_close(flat(twin), flat(model), "θ after the step")


def test_one_kind_of_term_inverts_one_kronecker_product():
    model, x_in, _ = problem(12, 6)
    theta0 = flat(model)
    J_in = reference_jacobian(model, x_in, interior, 2, [0, 1], EYE2)
    gradient = J_in[1].t() @ J_in[0] / len(x_in)
    factors, _ = reference_factors(model, x_in, interior, 2, [0, 1], EYE2)
    expected, offset = torch.zeros_like(gradient), 0
    for k, layer in enumerate(model.layers):
        out, inp = layer.weight.shape
        index = _wb_order(offset, out, inp)
        A, B = factors[k]
        C = torch.kron(
            B + 1e-2 * torch.eye(out, dtype=torch.float64), A + 1e-2 * torch.eye(inp + 1, dtype=torch.float64)
        )
        expected[index] = -torch.linalg.solve(C, gradient[index])
        offset += out * inp + out
    optimizer = KFAC(model.parameters(), damping=1e-2, ema_factor=0.0, line_search_fn=None)
    optimizer.step(lambda: residual_jacobian(model, x_in, interior))
    assert_step_close(flat(model) - theta0, expected, "θ1 − θ0")


def test_a_float32_model_keeps_float64_factors_and_solves():
    model, x_in, x_bd = problem(12, 6, dtype=torch.float32)
    theta0 = flat(model)
    J, r = dense_system(model, x_in, x_bd)
    interior_f, boundary_f = reference_pairs(model, x_in, x_bd)
    step = dense_kfac_step(model, J.t() @ r, averaged([interior_f], 0.5), averaged([boundary_f], 0.5), 1e-2)
    optimizer = KFAC(model.parameters(), damping=1e-2, ema_factor=0.5, line_search_fn=None)
    optimizer.step(closure_of(model, x_in, x_bd))
    state = optimizer.state["kfac"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert state["update"].dtype == torch.float64
    assert all(t.dtype == torch.float64 for pair in state["factors"]["interior"] for t in pair)
    assert all(t.dtype == torch.float64 for t in state["basis"][0][:4])
    assert_step_close(flat(model) - theta0, step, "θ1 − θ0 (float32)", tolerance=1e-4)


# ---------------------------------------------------------------------------------------------
# KF9, the automatic step size and momentum, against its dense quadratic model.


def quadratic_model_minimiser(G, g, directions, damping):
    """argmin_c gᵀ(M c) + ½ (M c)ᵀ (G + λI) (M c) for M = [directions], by torch.linalg.solve."""
    M = torch.stack(directions, 1)
    H = M.t() @ (G + damping * torch.eye(len(G), dtype=G.dtype)) @ M
    return torch.linalg.solve(H, -M.t() @ g)


def test_the_automatic_rule_minimises_the_quadratic_model():
    model, x_in, x_bd = problem(12, 6)
    probe = copy.deepcopy(model)
    damping, beta = 1e-3, 0.5
    optimizer = KFAC(model.parameters(), damping=damping, ema_factor=beta)
    # step 1: no previous update, the 1-d model along Δ
    J0, r0 = dense_system(probe, x_in, x_bd)
    first = reference_pairs(probe, x_in, x_bd)
    delta0 = dense_kfac_step(
        probe, J0.t() @ r0, averaged([first[0]], beta), averaged([first[1]], beta), damping
    )
    (eta0,) = quadratic_model_minimiser(J0.t() @ J0, J0.t() @ r0, [delta0], damping).tolist()
    theta0 = flat(model)
    optimizer.step(closure_of(model, x_in, x_bd))
    state = optimizer.state["kfac"]
    assert math.isclose(state["lr"], eta0, rel_tol=1e-9) and state["momentum"] == 0
    assert_step_close(flat(model) - theta0, eta0 * delta0, "u1")
    # step 2: the 2-d model in the plane of Δ and u1
    theta1 = flat(model)
    torch.nn.utils.vector_to_parameters(theta1, probe.parameters())
    J1, r1 = dense_system(probe, x_in, x_bd)
    second = reference_pairs(probe, x_in, x_bd)
    delta1 = dense_kfac_step(
        probe,
        J1.t() @ r1,
        averaged([first[0], second[0]], beta),
        averaged([first[1], second[1]], beta),
        damping,
    )
    u1 = eta0 * delta0
    eta1, mu1 = quadratic_model_minimiser(J1.t() @ J1, J1.t() @ r1, [delta1, u1], damping).tolist()
    optimizer.step(closure_of(model, x_in, x_bd))
    assert math.isclose(state["lr"], eta1, rel_tol=1e-8), (state["lr"], eta1)
    assert math.isclose(state["momentum"], mu1, rel_tol=1e-8), (state["momentum"], mu1)
    assert_step_close(flat(model) - theta1, eta1 * delta1 + mu1 * u1, "u2")


def test_the_grid_line_search_takes_the_lowest_loss_on_the_grid():
    model, x_in, x_bd = problem(12, 6)
    probe = copy.deepcopy(model)
    grid = [2.0**-k for k in range(8, -1, -1)]
    theta0, damping = flat(model), 1e-3
    J, r = dense_system(model, x_in, x_bd)
    f = reference_pairs(model, x_in, x_bd)
    step = dense_kfac_step(model, J.t() @ r, averaged([f[0]], 0.9), averaged([f[1]], 0.9), damping)

    def loss_at(theta):
        torch.nn.utils.vector_to_parameters(theta, probe.parameters())
        return 0.5 * dense_system(probe, x_in, x_bd)[1].square().sum()

    losses = torch.stack([loss_at(theta0 + eta * step) for eta in grid])
    best = grid[int(losses.argmin())]
    optimizer = KFAC(model.parameters(), damping=damping, ema_factor=0.9, line_search_fn="grid", grid=grid)
    optimizer.step(closure_of(model, x_in, x_bd))
    assert optimizer.state["kfac"]["lr"] == best
    assert_step_close(flat(model) - theta0, best * step, "θ after the line search")


# ---------------------------------------------------------------------------------------------
# The inverse every T steps, resume, skips.


def test_the_inverse_is_updated_every_inverse_every_steps():
    model, x_in, x_bd = problem(12, 6)
    optimizer = KFAC(model.parameters(), damping=1e-3, inverse_every=2)
    closure = closure_of(model, x_in, x_bd)
    made = []
    for _ in range(5):
        optimizer.step(closure)
        made.append(optimizer.state["kfac"]["basis_step"])
    assert made == [1, 1, 3, 3, 5]


def test_resume_from_state_dict_is_bitwise():
    model, x_in, x_bd = problem(12, 6, dtype=torch.float32)
    kwargs = dict(damping=1e-3, ema_factor=0.9, inverse_every=3)
    optimizer = KFAC(model.parameters(), **kwargs)
    for _ in range(2):
        optimizer.step(closure_of(model, x_in, x_bd))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    for _ in range(2):
        optimizer.step(closure_of(model, x_in, x_bd))
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    again = KFAC(resumed.parameters(), **kwargs)
    again.load_state_dict(saved)
    state = again.state["kfac"]
    assert (
        state["update"].dtype == torch.float64 and state["factors"]["interior"][0][0].dtype == torch.float64
    )
    for _ in range(2):
        again.step(closure_of(resumed, x_in, x_bd))
    assert torch.equal(flat(resumed), flat(model))
    assert torch.equal(again.state["kfac"]["update"], optimizer.state["kfac"]["update"])


def test_non_finite_residuals_skip_the_step_and_leave_the_averages():
    model, x_in, x_bd = problem(12, 6)
    optimizer = KFAC(model.parameters(), damping=1e-3)
    optimizer.step(closure_of(model, x_in, x_bd))
    theta1, factors = flat(model), copy.deepcopy(optimizer.state["kfac"]["factors"])
    bad = x_in.clone()
    bad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="residuals are not finite; the step is skipped"):
        optimizer.step(closure_of(model, bad, x_bd))
    state = optimizer.state["kfac"]
    assert torch.equal(flat(model), theta1) and state["skipped"] == {"steps": 1, "factors": 0, "inverses": 0}
    assert all(
        torch.equal(a, b)
        for a, b in zip(state["factors"]["interior"][0], factors["interior"][0], strict=True)
    )
    assert state["update"] is None and state["lr"] == 0


def test_a_non_finite_step_is_skipped_and_restores_the_averages_and_the_inverse(monkeypatch):
    import torch_backprop.optim.kfac as kfac_module

    model, x_in, x_bd = problem(12, 6)
    optimizer = KFAC(model.parameters(), damping=1e-3)
    optimizer.step(closure_of(model, x_in, x_bd))
    theta1 = flat(model)
    before = copy.deepcopy(optimizer.state["kfac"])
    monkeypatch.setattr(kfac_module, "apply_inverse", lambda basis, x: torch.full_like(x, math.nan))
    with pytest.warns(RuntimeWarning, match="preconditioned step is not finite"):
        optimizer.step(closure_of(model, x_in, x_bd))
    state = optimizer.state["kfac"]
    assert torch.equal(flat(model), theta1) and state["skipped"]["steps"] == 1
    for kind in ("interior", "boundary"):
        for got, want in zip(state["factors"][kind], before["factors"][kind], strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert state["basis_step"] == before["basis_step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(state["basis"][0][:4], before["basis"][0][:4], strict=True))


def test_non_finite_factors_skip_the_step():
    # r = √|u − u(x₀)| is finite at x₀ (zero) but its derivative there is not: G and B are not finite.
    model, x_in, x_bd = problem(12, 6)
    anchor = float(model(x_bd[:1])[0, 0])

    def kink(x, d):
        return (d.value[:, 0] - anchor).abs().sqrt()

    optimizer = KFAC(model.parameters(), damping=1e-3)
    theta0 = flat(model)
    with pytest.warns(RuntimeWarning, match="Kronecker factors are not finite"):
        optimizer.step(
            lambda: [residual_jacobian(model, x_in, interior), residual_jacobian(model, x_bd, kink, order=0)]
        )
    assert torch.equal(flat(model), theta0) and optimizer.state["kfac"]["skipped"]["factors"] == 1
    assert optimizer.state["kfac"]["factors"] == {}


def test_a_singular_factor_without_damping_skips_the_step_then_keeps_the_old_inverse():
    model, x_in, x_bd = problem(12, 6)
    optimizer = KFAC(model.parameters(), damping=0.0, ema_factor=0.0, initialize_to_identity=False)
    theta0 = flat(model)
    one_point = x_bd[:1]  # A_∂Ω of rank 1: no Cholesky factorisation
    with pytest.warns(RuntimeWarning, match="no inverse of the Kronecker factors"):
        optimizer.step(closure_of(model, x_in, one_point))
    assert torch.equal(flat(model), theta0) and optimizer.state["kfac"]["skipped"]["inverses"] == 1
    healthy = KFAC(model.parameters(), damping=1e-3, ema_factor=0.0)
    healthy.step(closure_of(model, x_in, x_bd))
    healthy.param_groups[0]["damping"] = 0.0
    theta1 = flat(model)
    with pytest.warns(RuntimeWarning, match="previous inverse is kept"):
        healthy.step(closure_of(model, x_in, one_point))
    assert healthy.state["kfac"]["skipped"]["inverses"] == 1 and not torch.equal(flat(model), theta1)


def test_kfac_solves_a_small_poisson_problem_without_warnings():
    model, x_in, x_bd = problem(100, 40, hidden=16)
    optimizer = KFAC(model.parameters(), damping=1e-8)
    closure = closure_of(model, x_in, x_bd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = optimizer.step(closure)
        for _ in range(59):
            last = optimizer.step(closure)
    assert last < 1e-2 * first


# ---------------------------------------------------------------------------------------------
# Bad inputs: one-line errors naming what was expected and what was given.


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": 0.0}, ValueError, "KFAC expects lr to be a finite number > 0, got 0.0"),
        (
            {"momentum": 1.0, "line_search_fn": None},
            ValueError,
            "momentum to be a finite number >= 0 and < 1, got 1.0",
        ),
        ({"damping": -1.0}, ValueError, "damping to be a finite number >= 0, got -1.0"),
        ({"ema_factor": 1.0}, ValueError, "ema_factor to be a finite number >= 0 and < 1, got 1.0"),
        ({"ema_factor": math.nan}, ValueError, "ema_factor"),
        ({"initialize_to_identity": 1}, TypeError, "initialize_to_identity True or False, got int"),
        ({"inverse_every": 0}, ValueError, "inverse_every to be an integer >= 1, got 0"),
        ({"inverse_every": 2.0}, ValueError, "inverse_every to be an integer >= 1, got 2.0"),
        (
            {"line_search_fn": "strong_wolfe"},
            ValueError,
            "line_search_fn 'auto', 'grid' or None, got 'strong_wolfe'",
        ),
        (
            {"momentum": 0.5},
            ValueError,
            "line_search_fn='auto' chooses the momentum itself .*got momentum=0.5",
        ),
        ({"grid": []}, ValueError, "grid as a non-empty list"),
        ({"grid": [0.5, -1.0], "line_search_fn": "grid"}, ValueError, "grid as a non-empty list"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    model, _, _ = problem(4, 2)
    with pytest.raises(error, match=match):
        KFAC(model.parameters(), **kwargs)


def test_bad_closures_and_parameter_groups():
    model, x_in, x_bd = problem(8, 4)
    optimizer = KFAC(model.parameters())
    theta0 = flat(model)
    with pytest.raises(TypeError, match="KFAC.step needs a closure"):
        optimizer.step(None)
    with pytest.raises(TypeError, match="got Tensor; a loss tensor carries no Jacobian"):
        optimizer.step(lambda: closure_of(model, x_in, x_bd)()[0].loss())
    with pytest.raises(ValueError, match="returned no terms"):
        optimizer.step(lambda: [])
    partial = KFAC(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="KFAC optimises 2 parameter tensors, but term 0's Jacobian has 4"):
        partial.step(closure_of(model, x_in, x_bd))
    assert torch.equal(flat(model), theta0) and not optimizer.state
    groups = [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
    with pytest.raises(ValueError, match="one parameter group, got 2"):
        KFAC(groups)
