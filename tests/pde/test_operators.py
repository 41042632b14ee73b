"""input_derivatives / laplacian (TY1-TY4, TA1-TA5) against torch.func on the native twin.

The reference is independent: ``torch.func.jacrev`` and ``torch.func.hessian`` of ``to_sequential()``
for u, ∂u and D u, and ``torch.func.grad`` through them (nested autograd) for the gradients of a loss
of the three in the parameters and the input. float64, tolerances from conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from _pde_reference import coefficient_cases, reference
from conftest import GRAD_TOLERANCE, OUTPUT_TOLERANCE, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, hessian, vmap

from torch_backprop import BackpropMLP, available_activations, register_activation
from torch_backprop.activations import get_activation
from torch_backprop.core import activations as registry
from torch_backprop.pde import input_derivatives, laplacian
from torch_backprop.pde.function import taylor_derivatives
from torch_backprop.pde.taylor import Coefficients, taylor_forward

ACTIVATIONS = available_activations()
F64_OUT, F64 = OUTPUT_TOLERANCE[torch.float64], GRAD_TOLERANCE[torch.float64]
# float32 against the float32 twin: second derivatives go through σ'' and two chains of products
# (ulp 1.2e-7 times a few hundred terms, twice), as tests/benchmarks/test_pde.py's bound.
F32_SECOND = (1e-4, 1e-5)


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
    # Entries registered by a test vanish after it, so other tests see only the built-ins.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def loss_of(u, du, Du, generator_seed=5):
    """A loss reading all three outputs with random weights (so every adjoint is nonzero)."""
    g = torch.Generator().manual_seed(generator_seed)
    weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (u, du, Du)]
    return sum((t * w).sum() for t, w in zip((u, du, Du), weights, strict=True)) + Du.square().sum()


def assert_equal_to_reference(model, x, coordinates, kwargs, matrix, tolerance=(F64_OUT, F64)):
    twin = model.to_sequential()
    x = x.detach().requires_grad_()
    drift = kwargs.get("drift")
    u, du, Du = input_derivatives(model, x, coordinates, **kwargs)
    ref_u, ref_du, ref_Du = reference(twin, x.detach(), coordinates, matrix, drift=drift)
    assert_close(u, ref_u, tolerance[0], "u")
    assert_close(du, ref_du, tolerance[1], "∂u")
    assert_close(Du, ref_Du, tolerance[1], "D u")
    names = ["input", *(n for n, _ in model.named_parameters())]
    grads = torch.autograd.grad(loss_of(u, du, Du), [x, *model.parameters()])

    def ref_loss(inputs, params):
        return loss_of(*reference(twin, inputs, coordinates, matrix, params, drift))

    ref_grads = torch.func.grad(ref_loss, argnums=(0, 1))(x.detach(), dict(twin.named_parameters()))
    for name, grad, ref in zip(names, grads, [ref_grads[0], *ref_grads[1].values()], strict=True):
        assert_close(grad, ref, tolerance[1], f"∂loss/∂{name}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_equals_torch_func(activation, bias):
    model = BackpropMLP([4, 6, 5, 2], activation, output_activation="tanh", bias=bias, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    (kwargs, matrix) = coefficient_cases(5, 4, torch.float64)["per-point-matrix+drift"]
    assert_equal_to_reference(model, x, [0, 1, 2, 3], kwargs, matrix)


@pytest.mark.parametrize("case", list(coefficient_cases(1, 1, torch.float64)))
@pytest.mark.parametrize("coordinates", [[0], [2, 0], [1, 1, 3]], ids=["one", "two", "repeated"])
def test_every_kind_of_coefficients_equals_torch_func(case, coordinates):
    model = BackpropMLP([4, 7, 7, 1], "gelu", dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64)
    kwargs, matrix = coefficient_cases(6, len(coordinates), torch.float64, dim=4)[case]
    assert_equal_to_reference(model, x, coordinates, kwargs, matrix)


@settings(max_examples=20, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    dims=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    hidden=st.sampled_from(ACTIVATIONS),
    output=st.sampled_from([None, "tanh", "softplus", "sigmoid"]),
    rows=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_random_architectures_equal_torch_func(widths, dims, hidden, output, rows, seed):
    torch.manual_seed(seed)
    d, out = dims
    model = BackpropMLP([d, *widths, out], hidden, output_activation=output, dtype=torch.float64)
    x = torch.randn(rows, d, dtype=torch.float64)
    kwargs, matrix = coefficient_cases(rows, d, torch.float64)["matrix+drift"]
    assert_equal_to_reference(model, x, list(range(d)), kwargs, matrix)


def test_laplacian_is_the_trace_of_the_hessian():
    model = BackpropMLP([10, 32, 32, 1], "tanh", dtype=torch.float64)
    x = torch.randn(8, 10, dtype=torch.float64)
    twin = model.to_sequential()
    u, grad, lap = laplacian(model, x)
    hess = vmap(hessian(twin))(x)  # (N, 1, 10, 10)
    assert_close(lap, hess.diagonal(dim1=-2, dim2=-1).sum(-1), F64, "Δu")
    assert grad.shape == (8, 1, 10)


def test_float32_equals_the_float32_twin():
    model = BackpropMLP([3, 16, 16, 1], "tanh")
    x = torch.randn(32, 3)
    kwargs, matrix = coefficient_cases(32, 3, torch.float32)["diagonal"]
    assert_equal_to_reference(
        model, x, [0, 1, 2], kwargs, matrix, tolerance=(OUTPUT_TOLERANCE[torch.float32], F32_SECOND)
    )


def test_leading_dimensions_and_an_empty_batch():
    model = BackpropMLP([3, 5, 2], "tanh", dtype=torch.float64)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    diagonal = torch.rand(2, 4, 2, dtype=torch.float64)
    u, du, Du = input_derivatives(model, x, [0, 2], diagonal=diagonal)
    flat = input_derivatives(model, x.reshape(8, 3), [0, 2], diagonal=diagonal.reshape(8, 2))
    assert u.shape == (2, 4, 2) and du.shape == (2, 4, 2, 2) and Du.shape == (2, 4, 2)
    for a, b, name in zip((u, du, Du), flat, ("u", "∂u", "D u"), strict=True):
        assert_close(a.reshape(b.shape), b, F64, name)
    empty = torch.empty(0, 3, dtype=torch.float64)
    u, du, Du = laplacian(model, empty)
    assert u.shape == (0, 2) and du.shape == (0, 2, 3) and Du.shape == (0, 2)
    sum(t.sum() for t in (u, du, Du)).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def _stack(model):
    return [layer.weight for layer in model.layers], [layer.bias for layer in model.layers]


def test_the_node_passes_gradcheck_and_gradgradcheck():
    model = BackpropMLP([3, 4, 4, 2], "silu", output_activation="tanh", dtype=torch.float64)
    weights, biases = _stack(model)
    c = Coefficients(
        torch.tensor([0, 2]),
        matrix=torch.tensor([[1.0, 0.3], [0.3, 2.0]], dtype=torch.float64),
        drift=torch.randn(3, 3, dtype=torch.float64),
    )
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return taylor_derivatives(x, model.activations, params[:3], params[3:], c)

    assert torch.autograd.gradcheck(f, (x, *weights, *biases))
    assert torch.autograd.gradgradcheck(f, (x, *weights, *biases))


def test_the_hand_written_backward_runs_and_matches_autograd_over_the_forward():
    """The node's TA1-TA5 and autograd over TY1-TY4 give the same gradients (and the node is used)."""
    model = BackpropMLP([3, 8, 8, 1], "tanh", dtype=torch.float64)
    x = torch.randn(7, 3, dtype=torch.float64)
    diagonal = torch.tensor([2.0], dtype=torch.float64)
    u, du, Du = input_derivatives(model, x, [1], diagonal=diagonal)
    assert type(Du.grad_fn).__name__ == "TaylorFunctionBackward"
    ours = torch.autograd.grad(loss_of(u, du, Du), list(model.parameters()))
    weights, biases = _stack(model)
    (u2, du2, Du2), _ = taylor_forward(
        x, model.activations, weights, biases, Coefficients(torch.tensor([1]), diagonal)
    )
    assert Du2.grad_fn is not None and type(Du2.grad_fn).__name__ != "TaylorFunctionBackward"
    ref = torch.autograd.grad(loss_of(u2, du2.permute(1, 2, 0), Du2), list(model.parameters()))
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_close(a, b, F64, f"parameter {k}")


def test_an_activation_without_third_derivative_is_differentiated_by_autograd():
    register_activation(
        "cube_test",
        lambda z: z**3,
        lambda z: 3 * z**2,
        second_derivative=lambda z: 6 * z,
        overwrite=True,
    )
    model = BackpropMLP([2, 4, 1], "cube_test", dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    kwargs, matrix = coefficient_cases(4, 2, torch.float64)["identity"]
    twin_act = get_activation("cube_test")
    assert twin_act.third_derivative is None
    assert_equal_to_reference(model, x, [0, 1], kwargs, matrix)


def test_coefficients_that_require_grad_get_their_gradient():
    model = BackpropMLP([3, 6, 1], "tanh", dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    diagonal = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    twin = model.to_sequential()
    _, _, Du = input_derivatives(model, x, diagonal=diagonal)
    (grad,) = torch.autograd.grad(Du.sum(), diagonal)
    hess = vmap(hessian(twin))(x)[:, 0]
    assert_close(grad, hess.diagonal(dim1=-2, dim2=-1), F64, "∂(D u)/∂C")


def test_double_backward_through_the_operator_equals_torch_func():
    """A Hessian-vector product of a residual loss in the parameters (create_graph=True)."""
    model = BackpropMLP([2, 5, 5, 1], "tanh", dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(6, 2, dtype=torch.float64)
    params = list(model.parameters())
    vector = [torch.randn_like(p) for p in params]

    def residual(u, du, Du):
        return (Du + u).square().mean() + du.square().mean()

    grads = torch.autograd.grad(residual(*laplacian(model, x)), params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector, strict=True)), params)
    names = [n for n, _ in twin.named_parameters()]
    identity = torch.eye(2, dtype=torch.float64)

    def ref_loss(p):
        return residual(*reference(twin, x, [0, 1], identity, p))

    tangents = dict(zip(names, vector, strict=True))
    _, ref_hvp = torch.func.jvp(torch.func.grad(ref_loss), (dict(twin.named_parameters()),), (tangents,))
    for name, a in zip(names, hvp, strict=True):
        assert_close(a, ref_hvp[name], F64, f"H v [{name}]")


class _Laplacian(torch.nn.Module):
    """Δu of a BackpropMLP as a module, so that torch.func.functional_call can swap its parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return laplacian(self.model, x).operator


def test_torch_func_and_compile_differentiate_the_same_forward():
    model = BackpropMLP([3, 6, 1], "gelu", dtype=torch.float64)
    twin = model.to_sequential()
    x = torch.randn(4, 3, dtype=torch.float64)
    wrapper = _Laplacian(model)
    params = dict(wrapper.named_parameters())
    grads = torch.func.grad(lambda p: functional_call(wrapper, p, (x,)).square().sum())(params)
    identity = torch.eye(3, dtype=torch.float64)
    ref = torch.func.grad(lambda p: reference(twin, x, [0, 1, 2], identity, p)[2].square().sum())(
        dict(twin.named_parameters())
    )
    for (name, a), b in zip(grads.items(), ref.values(), strict=True):
        assert_close(a, b, F64, f"torch.func.grad [{name}]")
    per_point = vmap(lambda p: laplacian(model, p.unsqueeze(0)).operator[0])(x)
    assert_close(per_point, laplacian(model, x).operator, F64, "vmap Δu")
    compiled = torch.compile(wrapper, backend="eager")
    assert_close(compiled(x), wrapper(x), F64, "compiled Δu")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda m, x: input_derivatives(m.to_sequential(), x),
            TypeError,
            "expects a torch_backprop.BackpropMLP",
        ),
        (lambda m, x: input_derivatives(m, x.float()), TypeError, "dtype torch.float64"),
        (lambda m, x: input_derivatives(m, x[:, :2]), ValueError, "last dimension 3"),
        (lambda m, x: input_derivatives(m, x, [0, 3]), ValueError, r"coordinates in \[0, 3\)"),
        (lambda m, x: input_derivatives(m, x, []), TypeError, "non-empty list of integers"),
        (lambda m, x: input_derivatives(m, x, [0.5]), TypeError, "non-empty list of integers"),
        (
            lambda m, x: input_derivatives(m, x, [0], diagonal=x[:, :1], matrix=x[:1, :1]),
            ValueError,
            "not both",
        ),
        (
            lambda m, x: input_derivatives(m, x, [0, 1], diagonal=x[:, :1]),
            ValueError,
            r"diagonal of shape \(2,\)",
        ),
        (lambda m, x: input_derivatives(m, x, [0, 1], matrix=x[:2]), ValueError, r"matrix of shape \(2, 2\)"),
        (
            lambda m, x: input_derivatives(m, x, [0], diagonal=x[0, :1].float()),
            TypeError,
            "diagonal of dtype",
        ),
    ],
    ids=[
        "twin",
        "dtype",
        "width",
        "coordinate",
        "empty-coordinates",
        "float-coordinate",
        "both",
        "diag-shape",
        "matrix-shape",
        "coefficient-dtype",
    ],
)
def test_bad_arguments_get_a_clear_error(call, error, match):
    model = BackpropMLP([3, 4, 1], "tanh", dtype=torch.float64)
    with pytest.raises(error, match=match):
        call(model, torch.randn(5, 3, dtype=torch.float64))


def test_what_cannot_be_exact_is_refused():
    from torch_backprop import per_sample

    x = torch.randn(4, 3, dtype=torch.float64)
    model = BackpropMLP([3, 4, 1], "tanh", dropout=0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="model.eval()"):
        laplacian(model, x)
    model.eval()
    laplacian(model, x)  # dropout is off in evaluation mode
    model = BackpropMLP([3, 4, 1], "tanh", dtype=torch.float64)
    with per_sample(model, "sum"), pytest.raises(RuntimeError, match="per_sample or curvature block"):
        laplacian(model, x)
    handle = model.layers[1].register_forward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match=r"layers\[1\] must run its own forward"):
        laplacian(model, x)
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast"):
        laplacian(model.float(), x.float())
    register_activation("no_second_test", torch.sin, torch.cos, overwrite=True)
    with pytest.raises(ValueError, match="needs σ'' of every activation"):
        laplacian(BackpropMLP([3, 4, 1], "no_second_test", dtype=torch.float64), x)
