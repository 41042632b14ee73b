"""torch.compile and torch.func (grad, vmap, jacrev) on BackpropMLP agree with eager native autograd."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import GRAD_TOLERANCE, OUTPUT_TOLERANCE, assert_close, run_and_grad
from torch.func import functional_call, grad, jacrev, vmap

from torch_backprop import BackpropMLP

TRANSFORM_ACTIVATIONS = ["relu", "tanh", "gelu", "silu", "softplus", "elu", "leaky_relu", "sigmoid"]
F64 = GRAD_TOLERANCE[torch.float64]


def _models(activation, dtype=torch.float64):
    model = BackpropMLP([4, 6, 5, 3], activation, output_activation="tanh", dtype=dtype)
    return model, model.to_sequential()


@pytest.mark.parametrize("activation", TRANSFORM_ACTIVATIONS)
def test_vmap_of_grad_matches_native_per_sample_gradients(activation):
    model, twin = _models(activation)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)

    def per_sample(module):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, xb, yb):
            return (functional_call(module, p, (xb,)) - yb).square().sum()

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow per-sample fallback of vmap
        ours = per_sample(model)
    ref = per_sample(twin)
    for (name, value), expected in zip(ours.items(), ref.values(), strict=True):
        assert value.shape == (5, *dict(model.named_parameters())[name].shape)
        assert_close(value, expected, F64, name)


@pytest.mark.parametrize("activation", TRANSFORM_ACTIVATIONS)
def test_jacrev_matches_native(activation):
    model, twin = _models(activation)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_close(jacrev(model)(x), jacrev(twin)(x), F64, "jacobian")


def test_hessian_of_input_matches_native():
    model, twin = _models("gelu")
    x = torch.randn(4, dtype=torch.float64)
    ours = jacrev(jacrev(lambda v: model(v).sum()))(x)
    ref = jacrev(jacrev(lambda v: twin(v).sum()))(x)
    assert_close(ours, ref, F64, "hessian")


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
def test_torch_compile_matches_eager_native(activation, recompute):
    torch._dynamo.reset()
    model = BackpropMLP([4, 6, 5, 3], activation, recompute=recompute)
    twin = model.to_sequential()
    compiled = torch.compile(model)
    x = torch.randn(8, 4, requires_grad=True)
    out, grads = run_and_grad(compiled, x)
    ref_out, ref_grads = run_and_grad(twin, x)
    assert_close(out, ref_out, OUTPUT_TOLERANCE[torch.float32], "output")
    for grad_, ref in zip(grads, ref_grads, strict=True):
        assert_close(grad_, ref, GRAD_TOLERANCE[torch.float32], "gradient")


def test_torch_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()
    model = BackpropMLP([4, 8, 3], "relu", dropout=0.2).eval()
    twin = model.to_sequential()
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    x, y = torch.randn(16, 4), torch.randint(3, (16,))
    loss = torch.nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(twin(x), y)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), OUTPUT_TOLERANCE[torch.float32], "loss")
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close(p.grad, q.grad, GRAD_TOLERANCE[torch.float32], "gradient")


@pytest.mark.parametrize("activation", TRANSFORM_ACTIVATIONS)
def test_batched_backward_matches_native(activation):
    # autograd.grad(is_grads_batched=True) vmaps the backward: BP2 must not use the out= kernels.
    model, twin = _models(activation)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    cotangents = torch.randn(3, 5, 3, dtype=torch.float64)
    ours = torch.autograd.grad(model(x), [x, *model.parameters()], cotangents, is_grads_batched=True)
    ref = torch.autograd.grad(twin(x), [x, *twin.parameters()], cotangents, is_grads_batched=True)
    for k, (g, r) in enumerate(zip(ours, ref, strict=True)):
        assert_close(g, r, F64, f"batched gradient {k}")
