"""Half precisions and autocast: BackpropMLP computes what the native stack computes."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOLERANCE, OUTPUT_TOLERANCE, assert_close, assert_matches_native, run_and_grad

from torch_backprop import BackpropMLP


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "silu", "sigmoid"])
def test_half_dtypes_match_native(dtype, activation):
    model = BackpropMLP([16, 32, 32, 8], activation, dtype=dtype)
    x = torch.randn(12, 16, dtype=dtype, requires_grad=True)
    assert_matches_native(model, x)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "softplus"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "x_nograd"])
def test_cpu_autocast_bfloat16_matches_native_autocast(activation, x_grad):
    model = BackpropMLP([16, 32, 32, 8], activation)
    twin = model.to_sequential()
    x = torch.randn(12, 16, requires_grad=x_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_and_grad(model, x)
        ref_out, ref_grads = run_and_grad(twin, x)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert_close(out, ref_out, OUTPUT_TOLERANCE[torch.bfloat16], "output")
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == ref.dtype  # parameter gradients come back in float32, as natively
        assert_close(grad, ref, GRAD_TOLERANCE[torch.bfloat16], "gradient")


def test_autocast_backward_outside_the_region_matches_native():
    model = BackpropMLP([16, 32, 8], "relu")
    twin = model.to_sequential()
    x = torch.randn(12, 16)
    for module in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(x).float().square().mean()
        loss.backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        assert_close(p.grad, q.grad, GRAD_TOLERANCE[torch.bfloat16], "gradient")


def test_float64_model_ignores_autocast_as_native_does():
    model = BackpropMLP([4, 5, 3], "tanh", dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.float64
        assert_matches_native(model, x)


def test_half_conversion_of_module():
    model = BackpropMLP([4, 5, 3]).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_matches_native(model, torch.randn(6, 4, dtype=torch.bfloat16))
    model.half()
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert_matches_native(model, torch.randn(6, 4, dtype=torch.float16))
