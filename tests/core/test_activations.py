"""The activation registry: each σ' against autograd's derivative of σ, and registration rules."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_native
from torch import nn

from torch_backprop import BackpropMLP, available_activations, get_activation, register_activation
from torch_backprop.core import activations as registry


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
    # Entries registered by a test vanish after it, so other tests see only the built-ins.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.mark.parametrize("name", available_activations())
def test_derivative_equals_autograd_derivative_of_sigma(name):
    act = get_activation(name)
    # include exact zero and the large-|z| regions (softplus threshold, saturation)
    z = torch.cat([torch.linspace(-30, 30, 301, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    z.requires_grad_()
    (expected,) = torch.autograd.grad(act.fn(z).sum(), z)
    z = z.detach()
    saved = {"h": act.fn(z), "z": z, "none": None}[act.derivative_from]
    if act.derivative_from != "none":
        torch.testing.assert_close(act.derivative(saved), expected, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(z)
    torch.testing.assert_close(act.backprop(grad, saved), grad * expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "act",
    [get_activation(name) for name in available_activations()]
    + [get_activation("elu", alpha=-1.0), get_activation("softplus", beta=2.0, threshold=3.0)],
    ids=repr,
)
def test_third_derivative_equals_autograd(act):
    z = torch.linspace(-6, 6, 121, dtype=torch.float64) + 0.0125  # off the kinks at 0
    saved = {"h": act.fn(z), "z": z, "none": z}[act.derivative_from]
    grad = torch.func.grad
    expected = torch.func.vmap(grad(grad(grad(act.fn))))(z)
    torch.testing.assert_close(act.third_derivative(saved), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "act",
    [get_activation(name) for name in available_activations()]
    + [get_activation("leaky_relu", negative_slope=-0.5), get_activation("elu", alpha=-1.0)],
    ids=repr,
)
def test_backprop_without_graph_and_into_a_fresh_gradient(act):
    # The plain backward phase (no create_graph) takes the fused kernel, and for a gradient it has
    # just made (overwrite=True) writes the product into that gradient: both must equal grad ⊙ σ'
    # from autograd's derivative of σ.
    z = torch.cat([torch.linspace(-30, 30, 301, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    z.requires_grad_()
    (expected,) = torch.autograd.grad(act.fn(z).sum(), z)
    z = z.detach()
    saved = {"h": act.fn(z), "z": z, "none": None}[act.derivative_from]
    grad = torch.randn_like(z)
    with torch.no_grad():
        torch.testing.assert_close(act.backprop(grad, saved), grad * expected, rtol=1e-10, atol=1e-12)
        fresh = grad.clone()
        result = act.backprop(fresh, saved, overwrite=True)
    torch.testing.assert_close(result, grad * expected, rtol=1e-10, atol=1e-12)
    assert result is fresh or act.derivative_from == "none"


def test_overwrite_is_never_taken_when_the_result_must_be_differentiable():
    act = get_activation("tanh")
    h = torch.tanh(torch.randn(5, dtype=torch.float64))
    grad = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fresh = grad * 1
    result = act.backprop(fresh, h, overwrite=True)  # grad mode on: create_graph's path
    assert result is not fresh
    (second,) = torch.autograd.grad(result.sum(), grad)
    torch.testing.assert_close(second, 1 - h * h)


def test_overwrite_with_a_user_activation_multiplies_in_place():
    register_activation("square", lambda z: z * z, lambda z: 2 * z)
    act = get_activation("square")
    z, grad = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    fresh = grad.clone()
    with torch.no_grad():
        result = act.backprop(fresh, z, overwrite=True)
    assert result is fresh
    torch.testing.assert_close(result, grad * 2 * z)


@pytest.mark.parametrize("name", available_activations())
def test_native_module_computes_sigma(name):
    act = get_activation(name)
    z = torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(act.to_module()(z), act.fn(z))
    assert registry.activation_from_module(act.to_module()) == act


@pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid", "elu", "leaky_relu"])
def test_output_based_derivatives_as_promised(name):
    assert get_activation(name).derivative_from == "h"


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "softplus"])
def test_input_based_derivatives(name):
    assert get_activation(name).derivative_from == "z"


def test_forward_is_in_place_only_when_z_is_not_needed():
    z = torch.randn(10)
    assert get_activation("relu").forward(z).data_ptr() == z.data_ptr()
    z = torch.randn(10)
    assert get_activation("gelu").forward(z).data_ptr() != z.data_ptr()


def test_register_user_activation_and_use_it():
    name = "test_square_plus"
    register_activation(name, lambda z: z * z + z, lambda z: 2 * z + 1, overwrite=True)
    assert name in available_activations()
    model = BackpropMLP([3, 5, 2], name, dtype=torch.float64)
    assert_matches_native(model, torch.randn(4, 3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradgradcheck(
        lambda x: model(x), (torch.randn(2, 3, dtype=torch.float64, requires_grad=True),)
    )


def test_register_from_output():
    name = "test_exp"
    register_activation(name, torch.exp, lambda h: h, derivative_from="h", overwrite=True)
    model = BackpropMLP([3, 4, 2], name, dtype=torch.float64)
    assert_matches_native(model, torch.randn(4, 3, dtype=torch.float64, requires_grad=True))


def test_registry_refuses_to_overwrite_unless_asked():
    with pytest.raises(ValueError, match="'relu' is already registered; pass overwrite=True"):
        register_activation("relu", torch.relu, lambda z: (z > 0).double())
    assert get_activation("relu").fused is not None  # unchanged


def test_register_errors():
    with pytest.raises(TypeError, match="non-empty string name"):
        register_activation("", torch.relu, torch.sign)
    with pytest.raises(ValueError, match="derivative_from must be 'h', 'z' or 'none', got 'x'"):
        register_activation("test_bad", torch.relu, torch.sign, derivative_from="x")


def test_parameters_of_entries():
    assert get_activation("leaky_relu", negative_slope=0.3).params == {"negative_slope": 0.3}
    assert repr(get_activation("elu", alpha=2.0)) == "elu(alpha=2.0)"
    with pytest.raises(ValueError, match="does not take parameters"):
        get_activation("relu", alpha=1.0)


def test_from_module_error_lists_supported():
    with pytest.raises(TypeError, match="unsupported activation module Softmax; supported: .*ReLU"):
        registry.activation_from_module(nn.Softmax(dim=1))
