"""examples/poisson.py: its manufactured solution, its loss against the twin, and a short run."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import load_example
from conftest import GRAD_TOLERANCE, assert_close
from torch.func import hessian, vmap

F64 = GRAD_TOLERANCE[torch.float64]


@pytest.mark.parametrize("solution", ["cosines", "sines", "products"])
def test_the_source_is_minus_the_laplacian_of_the_exact_solution(solution):
    example = load_example("poisson")
    problem = example.PROBLEMS[solution]
    x = torch.rand(6, 4, dtype=torch.float64)
    hessians = vmap(hessian(problem.exact))(x)
    assert_close(problem.source(x), -hessians.diagonal(dim1=-2, dim2=-1).sum(-1), (1e-12, 1e-12), "f")
    _, boundary = example.sample_points(4, 32, torch.Generator().manual_seed(0), torch.float64)
    on_a_face = ((boundary == 0) | (boundary == 1)).any(1)
    assert bool(on_a_face.all())


def test_the_loss_and_its_gradients_equal_the_twins_by_torch_func():
    example = load_example("poisson")
    problem = example.PROBLEMS["sines"]
    model = example.BackpropMLP([3, 8, 8, 1], "tanh", dtype=torch.float64)
    twin = model.to_sequential()
    interior, boundary = example.sample_points(3, 16, torch.Generator().manual_seed(1), torch.float64)
    loss = example.poisson_loss(model, problem, interior, boundary)
    lap = vmap(hessian(lambda p: twin(p)[0]))(interior).diagonal(dim1=-2, dim2=-1).sum(-1)
    residual = (lap + problem.source(interior)) / torch.pi**2
    ref = residual.square().mean() + (twin(boundary)[:, 0] - problem.exact(boundary)).square().mean()
    assert_close(loss, ref, F64, "loss")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref, list(twin.parameters()))
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert_close(g, r, F64, name)


def test_a_short_run_learns_and_prints_its_error(capsys):
    example = load_example("poisson")
    torch.manual_seed(0)
    problem = example.PROBLEMS["sines"]
    model = example.BackpropMLP([2, 16, 16, 1], "tanh")
    before = example.relative_error(model, problem, 2)
    losses = example.train(model, problem, 2, steps=150, points=64, lr=1e-2, seed=0)
    assert losses[-1] < losses[0] and example.relative_error(model, problem, 2) < before
    assert example.main(["--dim", "3", "--steps", "2", "--points", "8", "--hidden", "8"]) == 0
    assert example.main(["--dim", "4", "--solution", "products", "--steps", "2", "--points", "8"]) == 0
    out = capsys.readouterr().out
    assert "relative L2 error" in out and "torch.func.hessian" in out and "x_{2i}" in out


def test_engd_solves_the_small_problem_far_below_adam(capsys):
    # Same model, points and steps: ENGD's relative error is orders of magnitude below Adam's.
    example = load_example("poisson")
    problem = example.PROBLEMS["sines"]
    errors = {}
    for name in ("adam", "engd"):
        torch.manual_seed(0)
        model = example.BackpropMLP([2, 16, 1], "tanh", dtype=torch.float64)
        if name == "adam":
            example.train(model, problem, 2, steps=40, points=64, lr=1e-2, seed=0)
        else:
            losses = example.train_engd(model, problem, 2, steps=40, points=64, seed=0)
            assert losses[-1] < 1e-3 * losses[0]
        errors[name] = example.relative_error(model, problem, 2)
    assert errors["engd"] < 0.05 * errors["adam"]
    argv = ["--dim", "2", "--steps", "2", "--points", "8", "--hidden", "8", "--optimizer", "engd"]
    assert example.main(argv) == 0
    assert "relative L2 error" in capsys.readouterr().out


def test_kfac_solves_the_small_problem_far_below_adam(capsys):
    # Same model, points and steps as above: KFAC's relative error is a tenth of Adam's or less.
    example = load_example("poisson")
    problem = example.PROBLEMS["sines"]
    errors = {}
    for name in ("adam", "kfac"):
        torch.manual_seed(0)
        model = example.BackpropMLP([2, 16, 1], "tanh", dtype=torch.float64)
        if name == "adam":
            example.train(model, problem, 2, steps=40, points=64, lr=1e-2, seed=0)
        else:
            losses = example.train_engd(model, problem, 2, steps=40, points=64, seed=0, kfac=True)
            assert losses[-1] < 1e-2 * losses[0]
        errors[name] = example.relative_error(model, problem, 2)
    assert errors["kfac"] < 0.1 * errors["adam"]
    argv = ["--dim", "2", "--steps", "2", "--points", "8", "--hidden", "8", "--optimizer", "kfac"]
    assert example.main(argv) == 0
    assert "relative L2 error" in capsys.readouterr().out
