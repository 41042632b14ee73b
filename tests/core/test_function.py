"""MLPFunction on its own: gradcheck, gradgradcheck, double backward, recompute, and properties."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOLERANCE, assert_close, assert_matches_native, run_and_grad
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_backprop import BackpropMLP, MLPFunction, available_activations, get_activation
from torch_backprop.functional import mlp

ACTIVATIONS = available_activations()


def _params(sizes, bias=True):
    weights = [
        torch.randn(o, i, dtype=torch.float64, requires_grad=True)
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    biases = [torch.randn(o, dtype=torch.float64, requires_grad=True) if bias else None for o in sizes[1:]]
    return weights, biases


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
def test_gradcheck_and_gradgradcheck(activation, recompute):
    sizes = [3, 4, 3, 2]
    weights, biases = _params(sizes)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return mlp(x, params[:3], params[3:], [activation, activation, activation], recompute=recompute)

    assert torch.autograd.gradcheck(f, (x, *weights, *biases))
    assert torch.autograd.gradgradcheck(f, (x, *weights, *biases))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_double_backward_matches_native(activation):
    # A gradient penalty: ‖∂Q/∂x‖² is differentiated once more, w.r.t. every parameter.
    model = BackpropMLP([4, 6, 5, 2], activation, output_activation=activation, dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(7, 4, dtype=torch.float64)

    def penalty_grads(module):
        xs = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(module(xs).square().sum(), xs, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), list(module.parameters()))

    for (name, _), grad, ref in zip(
        model.named_parameters(), penalty_grads(model), penalty_grads(twin), strict=True
    ):
        assert_close(grad, ref, GRAD_TOLERANCE[torch.float64], name)


def test_double_backward_through_parameter_gradients():
    # ∂/∂W of ‖∂Q/∂W‖² (as in meta-learning), not only input gradients.
    model = BackpropMLP([3, 5, 2], "tanh", dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(4, 3, dtype=torch.float64)

    def second(module):
        params = list(module.parameters())
        grads = torch.autograd.grad(module(x).sin().sum(), params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), params)

    for grad, ref in zip(second(model), second(twin), strict=True):
        assert_close(grad, ref, GRAD_TOLERANCE[torch.float64], "second derivative")


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "softplus"])
def test_recompute_gives_identical_gradients(activation):
    model = BackpropMLP([5, 8, 8, 3], activation, dtype=torch.float64, recompute=True)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert_matches_native(model, x)
    lean = BackpropMLP([5, 8, 8, 3], activation, dtype=torch.float64)
    lean.load_state_dict(model.state_dict())
    upstream = torch.randn(6, 3, dtype=torch.float64)
    _, grads = run_and_grad(model, x, upstream)
    _, lean_grads = run_and_grad(lean, x, upstream)
    for grad, lean_grad in zip(grads, lean_grads, strict=True):
        assert torch.equal(grad, lean_grad)


def _saved_storages(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def test_recompute_saves_only_inputs():
    model = BackpropMLP([5, 64, 64, 3], "gelu", recompute=True)
    x = torch.randn(32, 5)
    saved = _saved_storages(lambda: model(x))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert set(saved) - params == {x.untyped_storage().data_ptr()}


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "identity"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_lean_saves_no_more_activation_memory_than_native(activation, dropout):
    # Parameters are saved by reference (they live anyway; keeping them lets create_graph=True
    # rerun the forward), so what counts is every other storage kept for backward.
    model = BackpropMLP([50, 64, 64, 3], activation, dropout=dropout).train()
    twin = model.to_sequential()
    x = torch.randn(32, 50)

    def activation_bytes(module):
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        return sum(n for ptr, n in _saved_storages(lambda: module(x)).items() if ptr not in params)

    assert activation_bytes(model) <= activation_bytes(twin)


def test_sigma_prime_from_h_saves_no_pre_activation():
    # relu/tanh/... read σ' from h, so z is not kept: hidden outputs only (plus x and parameters).
    model = BackpropMLP([5, 7, 9, 3], "tanh")
    x = torch.randn(4, 5)
    saved = _saved_storages(lambda: model(x))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activation_bytes = sum(
        n for ptr, n in saved.items() if ptr not in params and ptr != x.untyped_storage().data_ptr()
    )
    assert activation_bytes == (7 + 9) * 4 * 4  # h^(1), h^(2) in float32; the output has no σ


def test_mlp_function_direct_call_and_non_differentiable_intermediates():
    weights, biases = _params([3, 4, 2])
    acts = (get_activation("tanh"), get_activation("identity"))
    x = torch.randn(5, 3, dtype=torch.float64)
    out, hidden = MLPFunction.apply(x, acts, False, None, *weights, *biases, None)
    expected_hidden = torch.tanh(x @ weights[0].t() + biases[0])
    torch.testing.assert_close(hidden, expected_hidden)
    torch.testing.assert_close(out, expected_hidden @ weights[1].t() + biases[1])
    assert out.requires_grad and not hidden.requires_grad


# Properties (Opacus's hypothesis tests are the model; the empty batch is included).


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(0, 6), activation=st.sampled_from(ACTIVATIONS), width=st.integers(1, 6))
def test_zero_upstream_gradient_gives_zero_gradients(batch, activation, width):
    model = BackpropMLP([3, width, 2], activation, dtype=torch.float64)
    x = torch.randn(batch, 3, dtype=torch.float64, requires_grad=True)
    _, grads = run_and_grad(model, x, torch.zeros(batch, 2, dtype=torch.float64))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6),
    activation=st.sampled_from(ACTIVATIONS),
    a=st.floats(-3, 3),
    b=st.floats(-3, 3),
)
def test_gradients_are_linear_in_grad_output(batch, activation, a, b):
    model = BackpropMLP([3, 5, 2], activation, dtype=torch.float64)
    x = torch.randn(batch, 3, dtype=torch.float64, requires_grad=True)
    g1, g2 = torch.randn(2, batch, 2, dtype=torch.float64)
    _, grads1 = run_and_grad(model, x, g1)
    _, grads2 = run_and_grad(model, x, g2)
    _, grads = run_and_grad(model, x, a * g1 + b * g2)
    for grad, grad1, grad2 in zip(grads, grads1, grads2, strict=True):
        torch.testing.assert_close(grad, a * grad1 + b * grad2, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(2, 9), split=st.integers(1, 8), activation=st.sampled_from(ACTIVATIONS))
def test_gradients_do_not_depend_on_how_the_batch_is_split(batch, split, activation):
    split = min(split, batch - 1)
    model = BackpropMLP([3, 5, 2], activation, dtype=torch.float64)
    x = torch.randn(batch, 3, dtype=torch.float64)
    upstream = torch.randn(batch, 2, dtype=torch.float64)
    _, whole = run_and_grad(model, x, upstream)
    _, first = run_and_grad(model, x[:split], upstream[:split])
    _, second = run_and_grad(model, x[split:], upstream[split:])
    for grad, part1, part2 in zip(whole, first, second, strict=True):
        torch.testing.assert_close(grad, part1 + part2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
def test_canonical_function_and_eager_twin_agree_with_native(activation, recompute):
    # In eager mode BackpropMLP goes through the classic-style twin of MLPFunction; the canonical
    # setup_context Function (used under torch.func and torch.compile) is checked here directly.
    weights, biases = _params([4, 6, 3])
    acts = (get_activation(activation), get_activation("identity"))
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 3, dtype=torch.float64)
    inputs = [x, *weights, *biases]
    out = MLPFunction.apply(x, acts, recompute, None, *weights, *biases, None)[0]
    grads = torch.autograd.grad(out, inputs, upstream)
    ref = torch.nn.functional.linear(
        acts[0].fn(torch.nn.functional.linear(x, weights[0], biases[0])), weights[1], biases[1]
    )
    ref_grads = torch.autograd.grad(ref, inputs, upstream)
    assert_close(out, ref, GRAD_TOLERANCE[torch.float64], "output")
    for grad, expected in zip(grads, ref_grads, strict=True):
        assert_close(grad, expected, GRAD_TOLERANCE[torch.float64], "gradient")
