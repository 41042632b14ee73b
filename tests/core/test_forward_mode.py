"""Forward mode (MLPFunction.jvp, the tangent phase T1-T2) against native forward mode on the twin.

Every forward-mode tool of PyTorch on BackpropMLP and on ``to_sequential()`` with the same
parameters, float64: torch.func (jvp, jacfwd, linearize, hessian = jacfwd(jacrev)), reverse over
forward, dual numbers, gradcheck's forward-AD checks, and the options (dropout, recompute, autocast).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import GRAD_TOLERANCE, assert_close
from torch.func import functional_call, hessian, jacfwd, jacrev, jvp, linearize, vmap
from torch.utils._pytree import tree_leaves

from torch_backprop import BackpropMLP, available_activations
from torch_backprop.functional import mlp

ACTIVATIONS = available_activations()
F64 = GRAD_TOLERANCE[torch.float64]


def _models(activation, **kwargs):
    model = BackpropMLP([3, 5, 4, 2], activation, output_activation="tanh", dtype=torch.float64, **kwargs)
    return model, model.to_sequential()


def _same(ours, ref, name, tolerance=F64):
    ours, ref = tree_leaves(ours), tree_leaves(ref)
    assert len(ours) == len(ref), name
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_close(a, b, tolerance, f"{name}[{k}]")


def _dual_tangent(module, x, v):
    with fwAD.dual_level():
        return fwAD.unpack_dual(module(fwAD.make_dual(x, v))).tangent


@pytest.fixture
def data():
    x = torch.randn(4, 3, dtype=torch.float64)
    return x, torch.randn_like(x)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_func_forward_mode_matches_native(activation, data):
    model, twin = _models(activation)
    x, v = data
    tools = {
        "jvp": lambda f: jvp(f, (x,), (v,)),
        "jacfwd": lambda f: jacfwd(f)(x),
        "linearize": lambda f: linearize(f, x)[1](v),
        "hessian": lambda f: hessian(lambda u: f(u).sum())(x[0]),
        "jacfwd(jacrev)": lambda f: jacfwd(jacrev(lambda u: f(u).square().sum()))(x),
        "reverse over forward": lambda f: jacrev(lambda u: jvp(f, (u,), (v[0],))[1])(x[0]),
        "vmap(jvp)": lambda f: vmap(lambda u, w: jvp(f, (u,), (w,))[1])(x, v),
        "dual numbers": lambda f: _dual_tangent(f, x, v),
        "jacobian forward-mode": lambda f: torch.autograd.functional.jacobian(
            f, x, strategy="forward-mode", vectorize=True
        ),
    }
    for name, tool in tools.items():
        _same(tool(model), tool(twin), name)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
def test_parameter_tangents_and_parameter_hessian_match_native(activation, data):
    model, twin = _models(activation)
    x, _ = data

    directions = [torch.randn_like(p) for p in model.parameters()]

    def tools(module):
        params = {k: p.detach() for k, p in module.named_parameters()}
        tangents = dict(zip(params, directions, strict=True))
        out = jvp(lambda p: functional_call(module, p, (x,)), (params,), (tangents,))
        curvature = hessian(lambda p: functional_call(module, p, (x,)).square().sum())(params)
        return out, curvature

    _same(tools(model), tools(twin), "parameter jvp and hessian")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
def test_gradcheck_forward_ad_and_forward_over_reverse(activation, recompute):
    weights = [torch.randn(o, i, dtype=torch.float64, requires_grad=True) for i, o in [(3, 4), (4, 2)]]
    biases = [torch.randn(o, dtype=torch.float64, requires_grad=True) for o in (4, 2)]
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return mlp(x, params[:2], params[2:], [activation, "tanh"], recompute=recompute)

    inputs = (x, *weights, *biases)
    assert torch.autograd.gradcheck(
        f, inputs, check_forward_ad=True, check_batched_forward_grad=True, check_batched_grad=True
    )
    assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu", "silu"])
def test_dropout_tangent_uses_the_forward_mask(activation, data):
    # Same seed: BackpropMLP draws its masks as nn.Dropout does, so both sides drop the same units.
    model, twin = _models(activation, dropout=0.4)
    model.train()
    twin.train()
    x, v = data
    for name, tool in {
        "jvp": lambda f: jvp(f, (x,), (v,)),
        "dual numbers": lambda f: _dual_tangent(f, x, v),
    }.items():
        torch.manual_seed(3)
        ours = tool(model)
        torch.manual_seed(3)
        _same(ours, tool(twin), f"dropout {name}")


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_recompute_forward_mode_matches_native(activation, data):
    model, twin = _models(activation, recompute=True)
    x, v = data
    _same(_dual_tangent(model, x, v), _dual_tangent(twin, x, v), "recompute dual numbers")
    _same(
        hessian(lambda u: model(u).sum())(x[0]), hessian(lambda u: twin(u).sum())(x[0]), "recompute hessian"
    )


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_autocast_tangent_matches_native(activation, data):
    model = BackpropMLP([3, 5, 4, 2], activation)
    twin = model.to_sequential()
    x, v = (t.float() for t in data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = _dual_tangent(model, x, v), _dual_tangent(twin, x, v)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert_close(ours, ref, GRAD_TOLERANCE[torch.bfloat16], "autocast tangent")


def test_only_some_tangents_given(data):
    # Tangents for the last bias alone, then the first weight alone: T1's missing terms are zero.
    model, twin = _models("tanh")
    x, _ = data
    for name in ["layers.2.bias", "layers.0.weight"]:

        def tool(module, name=name):
            params = {k: p.detach() for k, p in module.named_parameters()}
            key = (
                name
                if module is model
                else dict(zip(dict(model.named_parameters()), params, strict=True))[name]
            )
            return jvp(
                lambda p: functional_call(module, {**params, key: p}, (x,)),
                (params[key],),
                (torch.ones_like(params[key]),),
            )

        _same(tool(model), tool(twin), f"tangent of {name} only")


def test_forward_over_forward_raises_naming_the_reason(data):
    model, twin = _models("tanh")
    x, _ = data
    jacfwd(jacfwd(lambda u: twin(u).sum()))(x[0])  # the twin can
    with pytest.raises(NotImplementedError, match="forward mode over forward mode.*to_sequential"):
        jacfwd(jacfwd(lambda u: model(u).sum()))(x[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_cuda_forward_mode_matches_native(activation):
    model = BackpropMLP([3, 5, 4, 2], activation, dtype=torch.float64, device="cuda")
    twin = model.to_sequential()
    x = torch.randn(4, 3, dtype=torch.float64, device="cuda")
    v = torch.randn_like(x)
    for name, tool in {
        "jvp": lambda f: jvp(f, (x,), (v,)),
        "hessian": lambda f: hessian(lambda u: f(u).sum())(x[0]),
        "dual numbers": lambda f: _dual_tangent(f, x, v),
    }.items():
        _same(tool(model), tool(twin), f"cuda {name}")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model32, twin32 = model.float(), twin.float()
        ours, ref = _dual_tangent(model32, x.float(), v.float()), _dual_tangent(twin32, x.float(), v.float())
    assert_close(ours, ref, GRAD_TOLERANCE[torch.bfloat16], "cuda autocast tangent")
