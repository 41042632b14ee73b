"""CUDA variants of the equivalence checks; skipped cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOLERANCE, OUTPUT_TOLERANCE, assert_close, assert_matches_native, cuda, run_and_grad

from torch_backprop import BackpropMLP, available_activations

pytestmark = cuda


@pytest.mark.parametrize("activation", available_activations())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("depth", [1, 3])
def test_cuda_grid(activation, dtype, depth):
    sizes = [5, 7, 6, 3][: depth + 1]
    model = BackpropMLP(sizes, activation, output_activation="tanh", device="cuda", dtype=dtype)
    x = torch.randn(9, sizes[0], device="cuda", dtype=dtype, requires_grad=True)
    assert_matches_native(model, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cuda_half(dtype):
    model = BackpropMLP([64, 128, 10], "gelu", device="cuda", dtype=dtype)
    assert_matches_native(model, torch.randn(32, 64, device="cuda", dtype=dtype))


@pytest.mark.parametrize("activation", ["relu", "gelu", "softplus"])
def test_cuda_autocast_float16(activation):
    model = BackpropMLP([64, 128, 10], activation, device="cuda")
    twin = model.to_sequential()
    x = torch.randn(32, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out, grads = run_and_grad(model, x)
        ref_out, ref_grads = run_and_grad(twin, x)
    assert out.dtype == ref_out.dtype
    assert_close(out, ref_out, OUTPUT_TOLERANCE[torch.float16], "output")
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref, GRAD_TOLERANCE[torch.float16], "gradient")


def test_cuda_module_moves_and_dropout():
    model = BackpropMLP([8, 16, 4], dropout=0.3).cuda()
    assert model.layers[0].weight.is_cuda
    model.train()
    out = model(torch.randn(5, 8, device="cuda"))
    out.sum().backward()
    assert model.layers[0].weight.grad.is_cuda
