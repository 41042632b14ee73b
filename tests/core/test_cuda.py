"""CUDA variants of the equivalence checks; skipped cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import GRAD_TOLERANCE, OUTPUT_TOLERANCE, assert_close, assert_matches_native, cuda, run_and_grad

from torch_backprop import BackpropMLP, available_activations
from torch_backprop.core.phases import dropout_masks

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


def dropout_against_a_native_forward(device: str) -> None:
    """BackpropMLP in training on ``device`` against autograd on a hand-written forward with its masks."""
    model = BackpropMLP([8, 16, 4], dropout=0.3).to(device)
    assert all(p.device.type == device for p in model.parameters())
    x = torch.randn(5, 8, device=device)
    upstream = torch.randn(5, 4, device=device)
    torch.manual_seed(3)
    out = model.train()(x)
    grads = torch.autograd.grad(out, list(model.parameters()), upstream)
    torch.manual_seed(3)  # the same draw gives the masks BackpropMLP used
    (mask,) = dropout_masks(5, [16], 0.3, torch.float32, x.device)
    assert (mask == 0).any() and (mask != 0).any()
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]  # W0, b0, W1, b1
    ref = F.linear(torch.relu(F.linear(x, params[0], params[1])) * mask, params[2], params[3])
    ref_grads = torch.autograd.grad(ref, params, upstream)
    assert_close(out, ref, OUTPUT_TOLERANCE[torch.float32], "output")
    for (name, _), grad, expected in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert grad.device == x.device
        assert_close(grad, expected, GRAD_TOLERANCE[torch.float32], name)


def test_cuda_module_moves_and_dropout_matches_native_with_its_masks():
    dropout_against_a_native_forward("cuda")
