"""The PDE operators speak of the function that was called, and warn when σ'' ≡ 0 makes D u first-order."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from torch_backprop import BackpropMLP, input_derivatives, laplacian

ZERO = "has σ'' ≡ 0, so the second-order part of the operator is 0 at every point"


def points(dim: int = 3) -> torch.Tensor:
    return torch.rand(5, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_a_model_with_only_zero_second_derivatives_warns_and_its_laplacian_is_zero(activation):
    torch.manual_seed(0)
    model = BackpropMLP([3, 8, 8, 1], activation, dtype=torch.float64)
    x = points()
    with pytest.warns(
        UserWarning, match=f"laplacian: every activation of this BackpropMLP \\({activation}"
    ) as caught:
        lap = laplacian(model, x).operator
    assert ZERO in str(caught[0].message) and "tanh" in str(caught[0].message)  # what to use instead
    assert caught[0].filename == __file__  # it points at the caller's line, not the library's
    twin = model.to_sequential()
    hessians = torch.func.vmap(torch.func.hessian(lambda p: twin(p)[0]))(x)  # the independent reference
    torch.testing.assert_close(lap[:, 0], hessians.diagonal(dim1=-2, dim2=-1).sum(-1))
    assert not lap.any()


def test_input_derivatives_names_itself_in_the_warning():
    model = BackpropMLP([2, 4, 1], "relu")
    with pytest.warns(UserWarning, match="input_derivatives: every activation"):
        input_derivatives(model, torch.rand(3, 2), [1], diagonal=torch.ones(1))


@pytest.mark.parametrize(
    "activation", ["tanh", ["relu", "tanh"], "softplus"], ids=["tanh", "relu-tanh", "softplus"]
)
def test_no_warning_where_some_activation_has_a_second_derivative(activation):
    model = BackpropMLP([3, 8, 8, 1], activation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        laplacian(model, torch.rand(4, 3))


def test_the_warning_is_shown_once_per_calling_line():
    model = BackpropMLP([3, 8, 1], "relu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own default: once per location
        for _ in range(3):
            laplacian(model, torch.rand(4, 3))
    assert [str(w.message).split(":")[0] for w in caught] == ["laplacian"]


@pytest.mark.parametrize("function", [laplacian, input_derivatives], ids=["laplacian", "input_derivatives"])
def test_errors_name_the_function_that_was_called(function):
    with pytest.raises(
        TypeError, match=f"^{function.__name__} expects a torch_backprop.BackpropMLP, got Sequential$"
    ):
        function(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), torch.rand(2, 3))
    model = BackpropMLP([3, 4, 1], "tanh")
    with pytest.raises(ValueError, match=f"^{function.__name__} expects input with last dimension 3"):
        function(model, torch.rand(2, 5))
