"""ENGD (EN1-EN3, LS1-LS3) against a dense reference: J by torch.func.jacrev on the twin, torch.linalg.solve.

The reference never uses the optimiser's own pieces: the stacked residuals and Jacobian come from
tests/_pde_reference.py (nested autograd on ``to_sequential()``), the step from
``torch.linalg.solve`` of the damped Gauss–Newton system, the line search from the loss of the twin
at every grid point.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from _least_squares_problem import EYE2, boundary, closure_of, flat, interior
from _least_squares_problem import problem as _problem
from _pde_reference import reference_jacobian
from conftest import GRAD_TOLERANCE, assert_close

from torch_backprop import ENGD, BackpropMLP, residual_jacobian


def problem(n_interior, n_boundary, hidden=6, **kwargs):
    return _problem(n_interior, n_boundary, hidden, **kwargs)


F64 = GRAD_TOLERANCE[torch.float64]


def dense_system(model, x_in, x_bd, weights=(1.0, 1.0)):
    """(J̃, r̃) by torch.func in float64: rows scaled by √(w / N) (LS1)."""
    model64 = copy.deepcopy(model).double()
    r_in, J_in = reference_jacobian(model64, x_in.double(), interior, 2, [0, 1], EYE2)
    r_bd, J_bd = reference_jacobian(model64, x_bd.double(), boundary, 0)
    s_in, s_bd = math.sqrt(weights[0] / len(x_in)), math.sqrt(weights[1] / len(x_bd))
    return torch.cat([s_in * J_in, s_bd * J_bd]), torch.cat([s_in * r_in, s_bd * r_bd])


def dense_step(J, r, damping):
    """Δ = −(J̃ᵀJ̃ + λI)⁻¹ J̃ᵀ r̃, by torch.linalg.solve."""
    return -torch.linalg.solve(J.t() @ J + damping * torch.eye(J.shape[1], dtype=J.dtype), J.t() @ r)


def assert_step_close(actual, expected, theta0, J, damping, name, dtype=torch.float64):
    """θ0 + Δ against the reference, to the accuracy a solve allows: ‖δΔ‖ ≤ 10 κ ε ‖Δ‖ (κ: the damped
    Gramian's condition number, ε: the unit roundoff of the residuals' ``dtype``), the 10 for the two
    factorisations."""
    gramian = J.t() @ J + damping * torch.eye(J.shape[1], dtype=J.dtype)
    kappa = float(torch.linalg.cond(gramian))
    step, reference = actual - theta0, expected - theta0
    bound = 10 * kappa * torch.finfo(dtype).eps * float(reference.norm()) + 1e-14
    error = float((step - reference).norm())
    assert error <= bound, f"{name}: |δΔ| = {error:.2e} > {bound:.2e} (κ = {kappa:.1e})"


def loss_at(model, x_in, x_bd, theta, weights=(1.0, 1.0)):
    """L(θ) of the twin at flat parameters θ, by torch.func (independent of the tapes)."""
    probe = copy.deepcopy(model).double()
    torch.nn.utils.vector_to_parameters(theta, probe.parameters())
    _, r = dense_system(probe, x_in, x_bd, weights)
    return 0.5 * r.square().sum()


@pytest.mark.parametrize("space", ["parameters", "residuals", "auto"])
@pytest.mark.parametrize("points", [(30, 10), (8, 4)], ids=["N>D", "N<D"])
def test_one_step_equals_the_dense_gauss_newton_step(space, points):
    model, x_in, x_bd = problem(*points)
    J, r = dense_system(model, x_in, x_bd, (2.0, 0.5))
    damping, theta0 = 1e-6, flat(model)
    expected = theta0 + 0.7 * dense_step(J, r, damping)
    optimizer = ENGD(model.parameters(), lr=0.7, damping=damping, line_search_fn=None, solve_in=space)
    loss = optimizer.step(closure_of(model, x_in, x_bd, (2.0, 0.5)))
    assert_close(loss, 0.5 * r.square().sum(), F64, "loss before the step")
    assert_step_close(flat(model), expected, theta0, J, damping, "θ after the step")
    state = optimizer.state["engd"]
    assert state["step"] == 1 and state["lr"] == 0.7 and state["damping"] == damping
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("points", [(30, 10), (8, 4)], ids=["N>D", "N<D"])
def test_the_pseudo_inverse_step_is_the_minimum_norm_least_squares_step(points):
    # EN5 against torch.linalg.lstsq (gelsd, as the authors solve their Gramian) of the same
    # normal equations: (J̃ᵀJ̃) Δ = −J̃ᵀr̃ for N > D, Δ = −J̃ᵀ α with (J̃J̃ᵀ) α = r̃ for N < D; with
    # repeated points, so that J̃ has dependent rows and the kernel is singular.
    model, x_in, x_bd = problem(*points)
    x_in = torch.cat([x_in, x_in[:3]])
    theta0 = flat(model)
    J, r = dense_system(model, x_in, x_bd)
    if J.shape[0] > J.shape[1]:  # full rank: a damping keeps κ where a solve's error bound is tight
        damping, eye = 1e-4, torch.eye(J.shape[1], dtype=J.dtype)
        matrix, right = J.t() @ J + damping * eye, -(J.t() @ r)
        step = torch.linalg.lstsq(matrix, right.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    else:  # the singular kernel, undamped: the minimum-norm solution
        damping = 0.0
        step = -J.t() @ torch.linalg.lstsq(J @ J.t(), r.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    expected = theta0 + step
    optimizer = ENGD(model.parameters(), damping=damping, line_search_fn=None, solver="pseudo-inverse")
    optimizer.step(closure_of(model, x_in, x_bd))
    assert_step_close(flat(model), expected, theta0, J, max(damping, 1e-8), "θ after a pseudo-inverse step")
    assert optimizer.state["engd"]["rank"] <= min(J.shape)


def test_momentum_is_heavy_ball_on_the_update():
    model, x_in, x_bd = problem(30, 10)
    probe = copy.deepcopy(model)
    optimizer = ENGD(model.parameters(), lr=0.5, momentum=0.9, damping=1e-6, line_search_fn=None)
    closure = closure_of(model, x_in, x_bd)
    optimizer.step(closure)
    theta1 = flat(model)
    optimizer.step(closure)
    # reference: u1 = η Δ(θ0), u2 = η Δ(θ1) + μ u1
    J0, r0 = dense_system(probe, x_in, x_bd)
    u1 = 0.5 * dense_step(J0, r0, 1e-6)
    torch.nn.utils.vector_to_parameters(theta1, probe.parameters())
    J1, r1 = dense_system(probe, x_in, x_bd)
    u2 = 0.5 * dense_step(J1, r1, 1e-6) + 0.9 * u1
    assert_step_close(flat(model), theta1 + u2, theta1, J1, 1e-6, "θ2")
    assert_step_close(optimizer.state["engd"]["update"], u2, 0 * u2, J1, 1e-6, "u2")


def test_the_averaged_gramian_is_the_authors_moving_average():
    # EN4 over two steps from G_0 = I: G_1 = β I + (1-β) J̃₀ᵀJ̃₀, G_2 = β G_1 + (1-β) J̃₁ᵀJ̃₁.
    model, x_in, x_bd = problem(8, 4)  # N < D: the average makes "auto" solve in parameter space
    probe, beta, damping = copy.deepcopy(model), 0.3, 1e-6
    optimizer = ENGD(
        model.parameters(), lr=0.5, damping=damping, line_search_fn=None, ema_factor=beta,
        initialize_to_identity=True,
    )  # fmt: skip
    closure = closure_of(model, x_in, x_bd)
    optimizer.step(closure)
    theta1 = flat(model)
    optimizer.step(closure)
    J0, r0 = dense_system(probe, x_in, x_bd)
    eye = torch.eye(J0.shape[1], dtype=torch.float64)
    G1 = beta * eye + (1 - beta) * J0.t() @ J0
    expected1 = flat(probe) - 0.5 * torch.linalg.solve(G1 + damping * eye, J0.t() @ r0)
    assert_close(theta1, expected1, F64, "θ1")
    torch.nn.utils.vector_to_parameters(theta1, probe.parameters())
    J1, r1 = dense_system(probe, x_in, x_bd)
    G2 = beta * G1 + (1 - beta) * J1.t() @ J1
    expected2 = theta1 - 0.5 * torch.linalg.solve(G2 + damping * eye, J1.t() @ r1)
    assert_close(flat(model), expected2, F64, "θ2")
    assert_close(optimizer.state["engd"]["gramian"], G2, F64, "G_2")


def test_the_grid_line_search_takes_the_lowest_loss_on_the_grid():
    model, x_in, x_bd = problem(30, 10)
    grid = [2.0**-k for k in range(8, -1, -1)]
    theta0 = flat(model)
    J, r = dense_system(model, x_in, x_bd)
    step = dense_step(J, r, 1e-3)
    losses = torch.stack([loss_at(model, x_in, x_bd, theta0 + eta * step) for eta in grid])
    assert losses.min() < 0.5 * r.square().sum() and losses.argmin() != len(grid) - 1  # an inner minimum
    best = grid[int(losses.argmin())]
    optimizer = ENGD(model.parameters(), damping=1e-3, grid=grid)
    optimizer.step(closure_of(model, x_in, x_bd))
    assert optimizer.state["engd"]["lr"] == best
    assert_step_close(flat(model), theta0 + best * step, theta0, J, 1e-3, "θ after the line search")


def test_a_step_that_raises_the_loss_everywhere_on_the_grid_is_skipped():
    model, x_in, x_bd = problem(30, 10)
    theta0 = flat(model)
    optimizer = ENGD(model.parameters(), grid=[1e6, 1e7])
    with pytest.warns(RuntimeWarning, match="no step size .* lowers the loss"):
        optimizer.step(closure_of(model, x_in, x_bd))
    assert torch.equal(flat(model), theta0)
    state = optimizer.state["engd"]
    assert state["lr"] == 0 and state["skipped"] == 1 and torch.count_nonzero(state["update"]) == 0


def test_a_singular_kernel_raises_the_damping_once_and_says_so():
    model, x_in, _ = problem(4, 1, hidden=8)
    x_in = torch.cat([x_in, x_in])  # repeated points: J Jᵀ is singular
    optimizer = ENGD(model.parameters(), damping=0.0, line_search_fn=None, lr=1e-3, solve_in="residuals")
    closure = lambda: residual_jacobian(model, x_in, interior)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="not positive definite .* raised to") as caught:
        optimizer.step(closure)
        optimizer.step(closure)
    assert sum("positive definite" in str(w.message) for w in caught) == 1
    state = optimizer.state["engd"]
    assert state["damping"] > 0 and state["damping_raised"] == 2
    assert torch.isfinite(flat(model)).all()


def test_non_finite_residuals_skip_the_step():
    model, x_in, x_bd = problem(30, 10)
    x_in[0, 0] = math.nan
    theta0 = flat(model)
    optimizer = ENGD(model.parameters())
    with pytest.warns(RuntimeWarning, match="not finite; the step is skipped"):
        optimizer.step(closure_of(model, x_in, x_bd))
    assert torch.equal(flat(model), theta0) and optimizer.state["engd"]["skipped"] == 1


def test_a_float32_model_is_solved_in_float64():
    model, x_in, x_bd = problem(30, 10, dtype=torch.float32)
    J, r = dense_system(model, x_in, x_bd)
    theta0 = flat(model)
    expected = theta0 + dense_step(J, r, 1e-2)
    optimizer = ENGD(model.parameters(), damping=1e-2, line_search_fn=None)
    optimizer.step(closure_of(model, x_in, x_bd))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert optimizer.state["engd"]["update"].dtype == torch.float64
    assert_step_close(flat(model), expected, theta0, J, 1e-2, "θ after a float32 step", torch.float32)


AVERAGES = [{}, {"ema_factor": 0.3, "initialize_to_identity": True}]


@pytest.mark.parametrize("average", AVERAGES, ids=["plain", "ema"])
def test_resume_from_state_dict_is_bitwise(average):
    model, x_in, x_bd = problem(30, 10)
    optimizer = ENGD(model.parameters(), lr=0.3, momentum=0.5, line_search_fn=None, **average)
    optimizer.step(closure_of(model, x_in, x_bd))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    optimizer.step(closure_of(model, x_in, x_bd))
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    again = ENGD(resumed.parameters(), lr=0.3, momentum=0.5, line_search_fn=None, **average)
    again.load_state_dict(saved)
    assert again.state["engd"]["update"].dtype == torch.float64
    again.step(closure_of(resumed, x_in, x_bd))
    assert torch.equal(flat(resumed), flat(model))


def test_engd_solves_a_small_poisson_problem():
    # Fixed points, the default grid line search: the loss falls by orders of magnitude in 30 steps.
    model, x_in, x_bd = problem(100, 40, hidden=32)
    optimizer = ENGD(model.parameters(), damping=1e-6)
    closure = closure_of(model, x_in, x_bd)
    first = optimizer.step(closure)
    for _ in range(29):
        last = optimizer.step(closure)
    assert last < 1e-4 * first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr to be a finite number > 0, got 0.0"),
        ({"momentum": 1.0}, "momentum to be a finite number >= 0 and < 1, got 1.0"),
        ({"damping": -1.0}, "damping to be a finite number >= 0, got -1.0"),
        ({"damping": math.nan}, "damping"),
        ({"line_search_fn": "strong_wolfe"}, "line_search_fn 'grid' or None, got 'strong_wolfe'"),
        ({"grid": []}, "grid as a non-empty list"),
        ({"grid": [0.5, -1.0]}, "grid as a non-empty list"),
        ({"solve_in": "kernel"}, "solve_in one of auto, parameters, residuals, got 'kernel'"),
        ({"solver": "svd"}, "solver one of cholesky, pseudo-inverse, got 'svd'"),
        ({"ema_factor": 1.0}, "ema_factor to be a finite number >= 0 and < 1, got 1.0"),
        ({"ema_factor": 0.5, "solve_in": "residuals"}, "averages the D × D Gramian"),
        ({"initialize_to_identity": True, "solve_in": "residuals"}, "averages the D × D Gramian"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    model, _, _ = problem(4, 2)
    with pytest.raises(ValueError, match=match):
        ENGD(model.parameters(), **kwargs)


def test_bad_closures_and_parameter_groups():
    model, x_in, x_bd = problem(8, 4)
    optimizer = ENGD(model.parameters())
    theta0 = flat(model)
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step(None)
    with pytest.raises(TypeError, match="got Tensor; a loss tensor carries no Jacobian"):
        optimizer.step(lambda: closure_of(model, x_in, x_bd)()[0].loss())
    with pytest.raises(ValueError, match="returned no terms"):
        optimizer.step(lambda: [])
    other = BackpropMLP([2, 6, 1], "tanh", dtype=torch.float64)
    with pytest.raises(ValueError, match="term 0's Jacobian has 4 .4 not in"):
        optimizer.step(lambda: residual_jacobian(other, x_in, interior))
    partial = ENGD(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="optimises 2 parameter tensors, but term 0's Jacobian has 4"):
        partial.step(closure_of(model, x_in, x_bd))
    assert torch.equal(flat(model), theta0)
    groups = [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
    with pytest.raises(ValueError, match="one parameter group, got 2"):
        ENGD(groups)


def test_no_warning_on_a_healthy_run():
    model, x_in, x_bd = problem(30, 10)
    optimizer = ENGD(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            optimizer.step(closure_of(model, x_in, x_bd))


@pytest.mark.parametrize("rows", [100, 1100, 4200])
def test_lower_gram_is_the_lower_triangle_of_the_product(rows):
    from torch_backprop.optim.least_squares import lower_gram

    a = torch.randn(rows, 37, dtype=torch.float64)
    for matrix in (a, a[:, :30].t()):  # rows × columns, and a transposed view (the Gramian's)
        assert_close(lower_gram(matrix).tril(), (matrix @ matrix.t()).tril(), F64, "lower triangle of a aᵀ")


def test_a_step_in_the_residual_space_with_many_points():
    # N = 1108 > 1024: the kernel is assembled by blocks; D = 1601 > N for the Woodbury solve.
    model, x_in, x_bd = problem(8, 1100, hidden=400)
    theta0 = flat(model)
    J, r = dense_system(model, x_in, x_bd)
    expected = theta0 + dense_step(J, r, 1e-4)
    optimizer = ENGD(model.parameters(), damping=1e-4, line_search_fn=None)
    optimizer.step(closure_of(model, x_in, x_bd))
    assert_step_close(flat(model), expected, theta0, J, 1e-4, "θ after a blocked kernel step")


def test_a_state_saved_before_an_option_existed_resumes_with_its_default():
    model, x_in, x_bd = problem(30, 10)
    optimizer = ENGD(model.parameters(), lr=0.3, line_search_fn=None)
    optimizer.step(closure_of(model, x_in, x_bd))
    saved = optimizer.state_dict()
    del saved["param_groups"][0]["ema_factor"]  # as written by a version without it
    again = ENGD(model.parameters(), lr=0.3, line_search_fn=None)
    again.load_state_dict(saved)
    assert again.param_groups[0]["ema_factor"] == 0.0
    again.step(closure_of(model, x_in, x_bd))
